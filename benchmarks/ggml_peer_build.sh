#!/bin/sh
# Build ggml's CPU backend from a local checkout and the harness benchmarks/ggml_peer.c against it,
# for benchmarks/peers.py's optional ggml TQ1_0 / TQ2_0 contenders. Downloads nothing: bring the
# checkout yourself (git clone https://github.com/ggml-org/ggml, or any copy of its tree).
#
#   sh benchmarks/ggml_peer_build.sh GGML_SOURCE_DIR [OUT_DIR]      (OUT_DIR: build/ggml_peer)
#   python benchmarks/peers.py --ggml-peer OUT_DIR/libggml_peer.so
#
# ggml is configured as llama.cpp's CPU builds are (Release, -march=native) but without OpenMP:
# ggml then runs on its own persistent threadpool (ggml_threadpool_new), the one the harness
# keeps per contender, rather than on a second OpenMP runtime beside the one torch loads.
set -eu
src=${1:?usage: ggml_peer_build.sh GGML_SOURCE_DIR [OUT_DIR]}
out=${2:-build/ggml_peer}
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$src/include/ggml.h" ] || { echo "ggml_peer_build.sh: $src is not a ggml checkout (no include/ggml.h)" >&2; exit 2; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
cmake -S "$src" -B "$out/ggml" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_OPENMP=OFF \
    -DBUILD_SHARED_LIBS=ON -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF
cmake --build "$out/ggml" -j "$(nproc)"
lib=$(dirname "$(find "$out/ggml" -name 'libggml-cpu.so' | head -n 1)")
cc -O2 -shared -fPIC -o "$out/libggml_peer.so" "$here/ggml_peer.c" -I"$src/include" \
    -L"$lib" -lggml-cpu -lggml-base -Wl,-rpath,"$lib"
echo "built $out/libggml_peer.so (ggml $(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo 'source tree'))"
