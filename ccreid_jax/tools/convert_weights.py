"""Converts torchvision / IBN-Net ResNet weights to a Flax-layout ``.npz``.

  python -m ccreid_jax.tools.convert_weights resnet50-19c8e357.pth resnet50.npz
  python -m ccreid_jax.tools.convert_weights resnet50_ibn_a.pth.tar r50_ibn_a.npz --ibn

IN is anything ``ccreid_jax.models.weights.read_state_dict`` reads (torch.save zip or legacy
checkpoint, .safetensors, .npz). OUT holds the trunk as flattened Flax paths
(``params/layer1_0/conv1/kernel``, ``batch_stats/bn1/mean``, ...), float32, and is loaded by
``load_pretrained`` (``model.pretrained=OUT``) without the original file or torch.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ccreid_jax.models import weights


def convert(src: str, dst: str, *, depth: int = 50, ibn: bool = False) -> dict[str, np.ndarray]:
  """Reads ``src``, maps it to Flax names and writes ``dst`` (exactly that path). Returns the
  flat ``{path: array}`` written."""
  state_dict = weights.read_state_dict(src)
  if weights.is_flax_state_dict(state_dict):
    flat = dict(state_dict)
  else:
    flat = weights.flatten_variables(weights.torchvision_to_flax(state_dict, depth=depth, ibn=ibn))
  flat = {k: np.asarray(v, np.float32) for k, v in sorted(flat.items())}
  parent = os.path.dirname(os.path.abspath(dst))
  os.makedirs(parent, exist_ok=True)
  with open(dst, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
    np.savez(f, **flat)  # type: ignore[arg-type]  # stub: **flat could fill allow_pickle
  return flat


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m ccreid_jax.tools.convert_weights", description=__doc__.split("\n")[0]
  )
  parser.add_argument("src", metavar="IN", help="torch checkpoint, .safetensors or .npz")
  parser.add_argument("dst", metavar="OUT", help="output .npz (Flax paths)")
  parser.add_argument("--depth", type=int, default=50, help="ResNet depth (default 50)")
  parser.add_argument("--ibn", action="store_true", help="IBN-Net ResNet-IBN-a weights")
  args = parser.parse_args(argv)
  try:
    flat = convert(args.src, args.dst, depth=args.depth, ibn=args.ibn)
  except (weights.WeightsFormatError, weights.WeightsMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = {"params": 0, "batch_stats": 0}
  for path, array in flat.items():
    count[path.split("/")[0]] += int(array.size)
  print(
    f"wrote {args.dst}: ResNet-{args.depth}{'-IBN-a' if args.ibn else ''} trunk, "
    f"{len(flat)} tensors, {count['params']:,} parameters, "
    f"{count['batch_stats']:,} batch-norm statistics"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
