#!/usr/bin/env bash
# facenet-pytorch (the MTCNN reference of eval/bench_mtcnn.py) on a CPU-only torch.
#
# facenet-pytorch needs torchvision (for its NMS kernel), and PyPI has only CUDA builds of torchvision for Linux:
# their _C.so links libc10_cuda.so / libtorch_cuda.so, which a CPU torch lacks, so `import torchvision.ops` fails.
# The CPU kernels never call into CUDA, so this script installs torchvision (matching the installed torch) and
# facenet-pytorch without dependencies into DIR, and builds a stub library that defines the CUDA-side symbols
# torchvision's _C.so asks for (each traps if ever called). Nothing outside DIR is touched.
#
#   bash eval/facenet_pytorch_cpu.sh /tmp/fnp
#   LD_LIBRARY_PATH=/tmp/fnp/stub PYTHONPATH=/tmp/fnp/site python eval/bench_mtcnn.py --cfp 64 --threads 2
set -euo pipefail
dir=${1:?usage: facenet_pytorch_cpu.sh DIR}
python=${PYTHON:-python}
torch_version=$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')
minor=$(echo "$torch_version" | cut -d. -f2)
torchvision_version="0.$((minor + 15)).0"  # torch 2.N pairs with torchvision 0.(N+15)
mkdir -p "$dir/site" "$dir/stub"
"$python" -m pip install --quiet --no-deps --target "$dir/site" "torchvision==$torchvision_version" "facenet-pytorch==2.6.0"
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
nm -D --undefined-only "$dir/site/torchvision/_C.so" | awk '{print $2}' | grep -v '@' | sort -u > "$dir/stub/wanted"
for lib in "$torch_lib"/*.so*; do nm -D --defined-only "$lib" 2>/dev/null | awk '{print $3}'; done | sort -u > "$dir/stub/defined"
comm -23 "$dir/stub/wanted" "$dir/stub/defined" | grep -E '^_Z.*cuda' | while read -r symbol; do
    case "$symbol" in
        *AllocatorE|*allocatorE) echo "char $symbol[64];" ;;  # a data symbol
        *) echo "void $symbol(void) { __builtin_trap(); }" ;;
    esac
done > "$dir/stub/stub.c"
cc -shared -fPIC -o "$dir/stub/libc10_cuda.so" "$dir/stub/stub.c"
cp "$dir/stub/libc10_cuda.so" "$dir/stub/libtorch_cuda.so"
LD_LIBRARY_PATH="$dir/stub" PYTHONPATH="$dir/site" "$python" -c 'import facenet_pytorch, torchvision.ops; print("facenet-pytorch", facenet_pytorch.__version__ if hasattr(facenet_pytorch, "__version__") else "2.6.0", "with torchvision", torchvision.__version__)'
echo "use: LD_LIBRARY_PATH=$dir/stub PYTHONPATH=$dir/site"
