"""`python -m pyserve.env`: what this pyserve install was built with and runs on."""

from __future__ import annotations

import json
import platform
import sys


def describe() -> dict:
    import torch

    import pyserve

    info = {
        "pyserve": pyserve.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "extension": pyserve.build_info(),
    }
    return info


def main() -> None:
    print(json.dumps(describe(), indent=2))


if __name__ == "__main__":
    main()
