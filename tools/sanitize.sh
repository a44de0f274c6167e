#!/usr/bin/env bash
# Build the native fast path (src/async_logging/_speedups.c) with AddressSanitizer and
# UndefinedBehaviorSanitizer into a scratch copy of the package, then run the differential
# tests and a mutation fuzz against it. Any memory error or undefined behaviour aborts the
# run with the sanitizer's report. Not part of CI (it needs the sanitizer runtimes preloaded
# into Python and runs several times slower); run it after changing the C code.
#
# Usage: tools/sanitize.sh [FUZZ_ITERATIONS]   (default 200000; needs gcc and the venv)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
N="${1:-200000}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
cp -r src/async_logging "$SCRATCH/"
rm -f "$SCRATCH"/async_logging/*.so
EXT="$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
gcc -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined \
    -shared -fPIC -I"$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
    src/async_logging/_speedups.c -o "$SCRATCH/async_logging/_speedups$EXT" -lm
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1   # CPython's allocator confuses LSan
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$SCRATCH"
python -c "import async_logging._speedups as s, sys; assert s.__file__.startswith('$SCRATCH'), s.__file__"
echo "== differential tests against the sanitized build"
python -m pytest -q -p no:cacheprovider tests/test_fastpath.py tests/test_encoded.py tests/test_door_limits.py \
    tests/test_native_split.py
echo "== mutation fuzz ($N frames)"
python - "$N" <<'PY'
import random
import sys

import msgpack
import orjson

sys.path.insert(0, "bench")
from _data import shuffled_transactions

from async_logging import _speedups

rng = random.Random(12345)
base = []
for n in (1, 3, 10):
    events = [e for tx in shuffled_transactions(n, seed=n) for e in tx]
    nested = [dict(e, data={"k": [1, 2.5, None, {"x": "é\n\"", "y": [True, -5, 2**63]}]}) for e in events]
    base += [msgpack.packb(events), msgpack.packb({"seq": 7, "logs": events}), msgpack.packb(nested)]
limits = [
    (4 << 20, 10000, 32, 65536, 256, 10000, 8 << 20, 64, 10000, 0),
    (4096, 50, 3, 8, 4, 2, 64, 2, 5, 1),
    (1 << 20, 3, 2, 16, 12, 1, 600, 1, 2, 0),
    (4 << 20, 10000, 32, 65536, 256, 10000, 8 << 20, 64, 10000, 1),
]
taken = split_taken = 0
for _ in range(int(sys.argv[1])):
    b = bytearray(rng.choice(base))
    for _ in range(rng.randint(1, 4)):
        if not b:
            break
        k, r = rng.randrange(len(b)), rng.random()
        if r < 0.4:
            b[k] = rng.randrange(256)
        elif r < 0.6:
            del b[k : k + rng.randint(1, 8)]
        elif r < 0.8:
            b[k:k] = rng.randbytes(rng.randint(1, 8))
        else:
            b[k] = rng.choice([0xC0, 0xC1, 0xC4, 0xD4, 0xD9, 0xDB, 0xDD, 0xDF, 0xCB, 0xCF, 0xFF, 0x00])
    if rng.random() < 0.1:
        b = bytearray(rng.randbytes(rng.randint(0, 64)))
    lim = rng.choice(limits)
    result = _speedups.reassemble(bytes(b), 1_700_000_000_000, lim, orjson.dumps)
    if result is not None:
        taken += 1
        for line in result[1].splitlines():
            orjson.loads(line)  # what is taken is valid JSON
    partitions = rng.choice([1, 3, 16, 1024])
    cut = _speedups.split(bytes(b), 1_700_000_000_000, lim, partitions, rng.randrange(partitions),
                          rng.choice([40, 4096, 1 << 30]))
    if cut is not None:
        split_taken += 1
        for part, count, body in cut[2]:  # each part: its events, whole, back to back
            assert 0 <= part < partitions
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            unpacker.feed(body)
            assert sum(1 for _ in unpacker) == count
print(f"{sys.argv[1]} mutated frames, {taken} reassembled, {split_taken} split; no sanitizer report")
PY
