"""Cluster Contrast on your own unlabeled images (``data.name = "folder"``); no published figure.

Training images: any folder tree of image files (.jpg .jpeg .png .bmp .ppm .pgm .tif .tiff
.webp) under ``data.root``, any file names, no identities needed: the pseudo labels come from
the clustering. Other files and names starting with "." are ignored. Cameras are optional:

* ``data.cameras = "none"`` (default): every image is camera 0; the batches are plain PxK
  (the reference's ``--no-cam``). Camera-aware options (``cluster.distance = "ca_jaccard"``,
  ``camera.enabled``) are refused.
* ``data.cameras = "folder"``: the sub-folder at ``data.camera_folder_level`` names the camera
  (1 = the first level under ``data.root``: ``root/cam_a/x.jpg`` is camera "cam_a").
* ``data.cameras = "regex"``: group 1 of the first match of ``data.camera_regex`` in the file
  name (default ``c(\\d+)``: ``0001_c3_17.jpg`` is camera "3").

Camera names become camera numbers 0, 1, ... in sorted order (numbers by value), logged at the
start.

Evaluation is optional: ``eval.list`` names a list file of labelled images, one per line
``query|gallery <path> <identity> <camera>`` (paths relative to the list file's folder; ``#``
comments), or ``eval.dataset`` / ``eval.root`` a labelled dataset in a known layout. Images
the list names are left out of training. Without either, the run trains without evaluation.

    python -m ccreid_jax.main --config custom --workdir runs/mine \\
        --config.data.root=/path/to/images --config.data.cameras=folder \\
        --config.model.pretrained=weights/resnet50-19c8e357.pth

Choose DBSCAN's radius (``cluster.eps``) for your data with the eps sweep, on the initial
model or any checkpoint, without retraining:

    python -m ccreid_jax.main --mode sweep --config custom --workdir runs/mine \\
        --config.data.root=/path/to/images --checkpoint init --eps 0.3:0.8:0.05 \\
        --config.model.pretrained=weights/resnet50-19c8e357.pth

Everything else is the published Cluster Contrast recipe (configs/default.py): ResNet-50
from ImageNet, 256x128 images (person-shaped; use e.g. 224x224 for vehicles), batches of 16
pseudo identities x 16 images. A folder needs at least 2 x max(train.num_instances,
cluster.min_samples) images (64 here).
"""

from ccreid_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.name = "folder"
  config.data.root = "my_images"
  return config
