"""`python -m pyserve`: the server entry point (the HTTP server lands with issue 5)."""

import sys

from pyserve.env import describe


def main() -> int:
    info = describe()
    ext = info["extension"]
    cuda = f"CUDA {ext['cuda_version']} ({', '.join(ext['cuda_archs'])})" if ext["cuda"] else "no CUDA kernels"
    print(f"pyserve {info['pyserve']}: kernel library built for {ext['cpu_isa']} with {cuda}; torch {info['torch']}")
    print("pyserve: the engine and the HTTP server are not built yet (issues 4 and 5); nothing to serve.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
