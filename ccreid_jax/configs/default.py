"""Every field of a ccreid_jax run, with the published Cluster Contrast defaults.

The recipes import this file (``from ccreid_jax.configs import default``) and override a few
fields. Any field can be overridden from the command line, e.g. ``--config.cluster.eps=0.5``.

Weights: every published recipe starts from ImageNet: torchvision's ResNet-50 IMAGENET1K_V1
(``resnet50-19c8e357.pth``) or IBN-Net's ``resnet50_ibn_a.pth.tar``, given with
``--config.model.pretrained=weights/<file>``; training refuses to start without it.
IMAGENET1K_V2 weights are another recipe, not comparable with the published figures.
Precision: ``model.precision = "default"`` lets GPUs run convolutions with TF32 passes, as
PyTorch's cuDNN default (``allow_tf32``) did for the reference on Ampere GPUs; "float32" asks
for true float32 products.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 1  # Seeds parameter init, sampler, augmentation; same seed => same run.

  config.data = data = ml_collections.ConfigDict()
  # market1501 | dukemtmcreid | msmt17 | veri776 | personx | folder (own images, configs/custom.py).
  data.name = "market1501"
  data.source = "folder"  # "folder": images under data.root | "tfds": a TFDS build (docs/tfds.md).
  # Parent of the dataset folder (or that folder itself); with source="tfds", the TFDS data_dir.
  data.root = "data"
  data.height = 256  # Input height after the bicubic resize.
  data.width = 128  # Input width after the bicubic resize.
  data.cache_dir = ""  # Where decoded uint8 images are cached ("" = <workdir>/cache).
  data.num_workers = 4  # Threads that decode images when the cache is built.
  data.skip_bad_names = False  # Skip (and log) files whose names do not parse, instead of failing.
  data.skip_bad_images = False  # Skip (and log) unreadable images, instead of failing.
  data.follow_symlinks_outside = False  # Accept image links that lead outside the dataset folder.
  # data.name="folder": camera of an image from "none" (all camera 0) | "folder" | "regex".
  data.cameras = "none"
  # data.cameras="folder": the sub-folder level naming the camera (1 = first under data.root).
  data.camera_folder_level = 1
  # data.cameras="regex": group 1 of its first match in the file name is the camera.
  data.camera_regex = r"c(\d+)"

  config.model = model = ml_collections.ConfigDict()
  # "resnet" | "resnet50_ibn_a" | "resnet101_ibn_a" (IBN-Net-a: instance norm in layer1-3).
  model.arch = "resnet"
  model.depth = 50  # ResNet depth: 10 | 18 | 34 | 50 | 101.
  model.width = 64  # Base width of the first stage (64 = torchvision).
  model.last_stride = 1  # Stride of layer4; 1 gives a 16x8 map for 256x128 input.
  model.pooling = "gem"  # "gem" (learnable p, init 3) or "avg".
  model.bn_group_size = 64  # GhostBatchNorm group; 64 = the reference's 4-GPU DataParallel chunks.
  model.dtype = "float32"  # Activation/matmul dtype: float32 | bfloat16.
  # Backbone weights file (ImageNet); "none" = random init on purpose; "" is refused for real data.
  model.pretrained = ""
  # Matmul/conv precision: "default" (TF32 on Ampere/Hopper GPUs) | "float32" (true float32).
  model.precision = "default"
  # "auto" (CPU kernels when JAX runs on the CPU) | "plain" (flax layers) | "cpu".
  model.kernels = "auto"

  config.train = train = ml_collections.ConfigDict()
  train.epochs = 50  # Training epochs (one clustering per epoch).
  train.iters = 200  # Train steps per epoch (200 Market/Duke, 400 MSMT17/VeRi).
  train.batch_size = 256  # Global batch: P pseudo identities x num_instances images.
  train.num_instances = 16  # K images per pseudo identity in a batch.
  train.log_every = 50  # Fetch metrics from the device every this many steps.
  train.eval_every = 10  # Evaluate on query/gallery every this many epochs (and at the end).
  train.eval_initial = False  # Also evaluate the initial features before the first epoch.

  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 3.5e-4  # Adam learning rate.
  optim.weight_decay = 5e-4  # Coupled L2 added to the gradient before Adam (not AdamW).
  optim.step_size = 20  # Multiply the lr by gamma every this many epochs.
  optim.gamma = 0.1  # Step decay factor.

  config.memory = memory = ml_collections.ConfigDict()
  memory.temperature = 0.05  # Softmax temperature tau of the memory logits.
  memory.momentum = 0.1  # Momentum mu of the centroid update.
  memory.update_rule = "momentum"  # After each step: "momentum" | "hard" (least similar) | "bmw".
  memory.bmw_pull = 0.9  # BMW: weight eta1 of the pull towards the cluster's hardest positive.
  memory.bmw_push = 0.2  # BMW: weight eta2 of the push away from the nearest other centroid.
  memory.bmw_dynamic_weights = True  # BMW: pull x (1 - cos), push x (1 + cos); False: unit weights.
  memory.min_bucket = 64  # Memory rows are padded to a power of two >= max(K, min_bucket).

  config.cluster = cluster = ml_collections.ConfigDict()
  cluster.method = "dbscan"  # Clustering algorithm: dbscan | infomap.
  # DBSCAN distance: "jaccard" (k-reciprocal) | "ca_jaccard" (camera-aware).
  cluster.distance = "jaccard"
  cluster.eps = 0.6  # DBSCAN radius on the Jaccard distance (inclusive).
  # SpCL's reliability criterion: DBSCAN at eps_tight/eps/eps_loose, unreliable members split off.
  cluster.reliable = False
  cluster.eps_tight = 0.58  # Reliability criterion: the tight radius (compactness).
  cluster.eps_loose = 0.62  # Reliability criterion: the loose radius (independence).
  cluster.min_samples = 4  # DBSCAN core-point threshold, the point itself included.
  cluster.k1 = 30  # Jaccard k-reciprocal neighbourhood size.
  cluster.k2 = 6  # Jaccard query-expansion size.
  cluster.ca_k1_intra = 5  # CA-Jaccard: k-reciprocal size on the same-camera list (self included).
  cluster.ca_k1_inter = 20  # CA-Jaccard: k-reciprocal size on the other-camera list.
  # CA-Jaccard: query expansion over this many same-camera neighbours (self included).
  cluster.ca_k2_intra = 2
  cluster.ca_k2_inter = 4  # CA-Jaccard: query expansion over this many other-camera neighbours.
  # CA-Jaccard: ca_k2_intra in the first epoch (the reference's warm-up).
  cluster.ca_k2_intra_first = 3
  cluster.ca_k2_inter_first = 3  # CA-Jaccard: ca_k2_inter in the first epoch.
  cluster.infomap_k = 15  # InfoMap: kNN size (self included).
  cluster.infomap_min_similarity = 0.5  # InfoMap: keep edges while cosine >= this.
  cluster.infomap_min_cluster_size = 5  # InfoMap: smaller clusters become outliers (ref. k2=4).
  cluster.infomap_seed = 0  # InfoMap's seed; 0 = the infomap package's default, as the reference.

  config.rlcc = rlcc = ml_collections.ConfigDict()
  rlcc.enabled = False  # RLCC: soft targets from the consensus of consecutive clusterings.
  rlcc.alpha = 0.9  # Weight of the current one-hot in the target (1.0 = plain Cluster Contrast).
  rlcc.beta = 0.0  # 0 = soft propagation P.Cbar, 1 = hard propagation Cbar[y'].
  rlcc.pred_temp = 30.0  # Temperature of q = softmax(pred_temp * f . c_prev).
  rlcc.outliers_as_singletons = False  # Official RLCC/SpCL: outliers become singleton classes.

  config.camera = camera = ml_collections.ConfigDict()
  # PPLR's inter-camera proxy loss, added to the memory loss (docs/algorithms.md section 12).
  camera.enabled = False
  camera.weight = 0.5  # Weight of the camera term (PPLR: 0.5; 1.0 in its MSMT17 command).
  camera.temperature = 0.07  # Temperature of the proxy logits.
  camera.num_hard_negatives = 50  # The hardest proxies of other clusters in each sample's softmax.
  camera.momentum = 0.2  # Proxy update after each step (CAP/O2CAP); 1.0 keeps them fixed, as PPLR.
  camera.min_bucket = 256  # Proxy rows are padded to a power of two >= max(proxies, min_bucket).
  camera.start_epoch = 0  # First epoch that trains with the camera term.

  config.augment = augment = ml_collections.ConfigDict()
  augment.flip_prob = 0.5  # Horizontal flip probability.
  augment.pad = 10  # Zero padding before the random crop.
  augment.erasing_prob = 0.5  # Random erasing probability.

  config.eval = ev = ml_collections.ConfigDict()
  ev.batch_size = 256  # Images per feature-extraction batch (train and test).
  # Test-time flip: features of each image and its mirror averaged, L2-normalised again.
  ev.flip = False
  ev.checkpoint = "best"  # Which checkpoint --mode eval reads: best | latest | <epoch>.
  ev.rerank = False  # k-reciprocal re-ranking of the query-gallery distances (Zhong et al.).
  ev.rerank_k1 = 20  # Re-ranking k1.
  ev.rerank_k2 = 6  # Re-ranking k2.
  ev.rerank_lambda = 0.3  # Weight of the original distance in the re-ranked one.
  ev.dataset = ""  # Evaluate on this dataset's query/gallery (cross-domain); "" = data.name.
  ev.root = ""  # Root folder of eval.dataset; "" = data.root.
  # data.name="folder": list file of "query|gallery <path> <identity> <camera>" lines; "" = none.
  ev.list = ""

  config.log = log = ml_collections.ConfigDict()
  log.progress = True  # tqdm progress bars (quiet automatically when not a terminal).
  log.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard (needs tensorboardX).
  # Queries drawn in <workdir>/ranklist_<when>.png per evaluation; 0: none.
  log.ranklist_queries = 8
  log.ranklist_topk = 10  # Gallery matches drawn per query in the rank list.
  return config
