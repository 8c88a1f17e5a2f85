#!/usr/bin/env bash
# Build, here, the wheelhouse a GPU device machine needs to run sweeps (it has torch, transformers, numpy,
# pandas, matplotlib, ... but no hydra, omegaconf, ray or mlflow, and no network), for CPython 3.12 on
# manylinux x86_64, packed to travel with one device call next to the working tree (which always travels; the
# limit is 64 MiB a call). Then scripts/device/ray_sweep.sh installs it there.
#
#   bash scripts/device/build_wheelhouse.sh          # -> build/wheelhouse/{wheels/, site/, PLAN.txt}
#
# One call: the wheels installed here into a site tree for the device's Python (pip --target, no deps) and
# packed with xz (-9: ray's binaries compress far better than a wheel's deflate does; about 30 MiB in all):
# build/wheelhouse/site/{site.tar.xz, SHA256}, unpacked there into /tmp/site. Where that still does not fit
# beside the tree, the wheels are split into parts instead, one per call of the SAME warm machine
# (build/wheelhouse/part1/, part2/, ...; PLAN.txt says which).
#
# What goes in: ray (slimmed, 76 -> ~38 MB: no Java jar, no dashboard web client, no RLlib/Data/Serve/Tune/
# Train/LLM libraries; sweeps start Ray core without a dashboard), mlflow-skinny + sqlalchemy + alembic (the SQLite
# tracking store; the full `mlflow` wheel adds only the UI and server), hydra-core, omegaconf, antlr4
# (built here: 4.9.3 is an sdist), and every dependency of those that the device image does not have
# (its package list: /work/.library/device/KINDS.md). Versions are the ones installed in this venv, so
# the device runs what the tests ran. A wheel bigger than a part is cut into byte chunks (split -b);
# MANIFEST.sha256 in every part lets the device reassemble and check each wheel.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-build/wheelhouse}
PY=${PY:-.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-64}          # the device tool's carry limit per call (tree + carried paths)
MARGIN_MIB=${MARGIN_MIB:-4}         # room for files that appear in the tree before the call
PYVER=${PYVER:-3.12}                # the device's Python (3.11 here builds a house to test the slimming locally)
PLAT=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none)
for t in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
         manylinux_2_17 manylinux2014 manylinux1; do PLAT+=(--platform "${t}_x86_64"); done
PLAT+=(--platform any)

# Already in the device image (scripts/device/device_packages.txt), normalised: - and _ and . alike.
DEVICE_HAS=$(grep -v '^#' scripts/device/device_packages.txt)

# Dependencies of mlflow-skinny that a sweep never imports (its Databricks and Google auth, its server, git
# tags): checked by running a sweep with eval=speed where only the device's packages and this house are
# importable. Left out, the packed site fits one call beside the working tree.
NOT_NEEDED="databricks-sdk google-auth pyasn1 pyasn1-modules rsa fastapi starlette uvicorn gitpython gitdb smmap
python-dotenv"

ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
WANT=("ray==$(ver ray)" "mlflow-skinny==$(ver mlflow-skinny)" "hydra-core==$(ver hydra-core)"
      "omegaconf==$(ver omegaconf)" "sqlalchemy==$(ver sqlalchemy)" "alembic==$(ver alembic)")
echo "wheelhouse for CPython $PYVER manylinux x86_64: ${WANT[*]}"

rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/dl"
# antlr4-python3-runtime 4.9.3 (what hydra-core 1.3 pins) exists only as an sdist: build its pure-Python wheel
"$PY" -m pip wheel -q --no-deps "antlr4-python3-runtime==4.9.3" -w "$OUT/dl" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip download -q "${PLAT[@]}" --find-links "$OUT/dl" -d "$OUT/dl" "${WANT[@]}" 2>&1 \
    | grep -v "^WARNING: Location" || true

# keep what the device lacks
"$PY" - "$OUT" "$DEVICE_HAS" "$NOT_NEEDED" <<'EOF'
import re, shutil, sys
from pathlib import Path
out, have = Path(sys.argv[1]), {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2].split()}
unused = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[3].split()}
kept, skipped = [], []
for whl in sorted((out / "dl").glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    if name in have or name in unused:
        skipped.append(whl.name)
    else:
        shutil.move(str(whl), out / "wheels" / whl.name)
        kept.append(whl.name)
print(f"kept {len(kept)} wheels the device lacks; {len(skipped)} are in the device image already or never imported:")
print("  " + " ".join(s.split("-")[0] for s in skipped))
EOF
rm -rf "$OUT/dl"

# slim the ray wheel (RECORD lines dropped too): no Java jar, no dashboard web client, none of the libraries on
# top of Ray core (RLlib, Data, Serve, Tune, Train, LLM) that a sweep never imports
"$PY" - "$OUT/wheels" <<'EOF'
import sys, zipfile
from pathlib import Path
for whl in Path(sys.argv[1]).glob("ray-*.whl"):
    drop = tuple(f"ray/{d}/" for d in ("jars", "dashboard/client/build", "rllib", "data", "serve", "tune", "train",
                                        "llm"))
    tmp = whl.with_suffix(".slim")
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename.startswith(drop):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True)
                                if not l.decode(errors="replace").startswith(drop))
            zout.writestr(info, data)
    before = whl.stat().st_size
    tmp.replace(whl)
    print(f"slimmed {whl.name}: {before / 2**20:.1f} -> {whl.stat().st_size / 2**20:.1f} MiB")
EOF

# the working tree that travels with every call: tracked + untracked-not-ignored files (+ shared/)
TREE=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
BUDGET=$(( LIMIT_MIB * 1048576 - TREE - MARGIN_MIB * 1048576 ))
echo "working tree: $(( TREE / 1048576 )) MiB -> $(( BUDGET / 1048576 )) MiB of wheels per call"
(( BUDGET > 8 * 1048576 )) || { echo "the working tree leaves under 8 MiB per call: ignore or move large files" >&2; exit 2; }

# one call: a site tree for the device's Python, xz-packed
SITE_TREE="$OUT/site_tree"
rm -rf "$SITE_TREE" && mkdir -p "$OUT/site"
"$PY" -m pip install -q --no-deps --no-compile --no-index --target "$SITE_TREE" "${PLAT[@]}" "$OUT"/wheels/*.whl \
    > "$OUT/site_install.log" 2>&1 || { cat "$OUT/site_install.log" >&2; exit 2; }
echo "site tree: $(du -sm "$SITE_TREE" | cut -f1) MiB unpacked; packing with xz -9 (a few minutes on 2 cores)"
tar cf - -C "$SITE_TREE" . | xz -9 -T0 > "$OUT/site/site.tar.xz"
(cd "$OUT/site" && sha256sum site.tar.xz > SHA256)
rm -rf "$SITE_TREE"
PACKED=$(stat -c %s "$OUT/site/site.tar.xz")
if (( PACKED <= BUDGET )); then
    printf '1 call (working tree %d MiB + site.tar.xz %.1f MiB of a %d MiB limit):\n  carry ["%s/site"], command: bash scripts/device/ray_sweep.sh run (or speed)\n' \
        $(( TREE / 1048576 )) "$(awk "BEGIN {print $PACKED / 1048576}")" "$LIMIT_MIB" "$OUT" | tee "$OUT/PLAN.txt"
    exit 0
fi
echo "site.tar.xz ($(( PACKED / 1048576 )) MiB) does not fit beside the tree: parts for several calls instead"
rm -rf "$OUT/site"

"$PY" - "$OUT" "$BUDGET" <<'EOF'
import hashlib, sys
from pathlib import Path
out, budget = Path(sys.argv[1]), int(sys.argv[2])
wheels = sorted((out / "wheels").glob("*.whl"), key=lambda p: -p.stat().st_size)
manifest = "".join(f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}\n" for w in sorted(wheels))
# pieces: whole wheels, or byte chunks of a wheel bigger than what is left in a part
pieces = []
for w in wheels:
    data = w.read_bytes()
    if len(data) <= budget // 2:
        pieces.append((w.name, data))
    else:
        step = budget // 2                            # two chunks of a big wheel can share a part with others
        for i in range(0, len(data), step):
            pieces.append((f"{w.name}.chunk{i // step:02d}", data[i:i + step]))
parts, sizes = [], []
for name, data in sorted(pieces, key=lambda p: -len(p[1])):     # first fit decreasing
    for i, s in enumerate(sizes):
        if s + len(data) <= budget:
            parts[i].append((name, data)); sizes[i] += len(data); break
    else:
        parts.append([(name, data)]); sizes.append(len(data))
for i, part in enumerate(parts, 1):
    d = out / f"part{i}"
    d.mkdir()
    for name, data in part:
        (d / name).write_bytes(data)
    (d / "MANIFEST.sha256").write_text(manifest)
plan = [f"{len(parts)} part(s) for {len(parts)} call(s) of the SAME warm device machine "
        f"(per call: working tree + at most {budget / 2**20:.0f} MiB):"]
for i, s in enumerate(sizes, 1):
    last = i == len(parts)
    cmd = "bash scripts/device/ray_sweep.sh " + ("run" if last else "stash")
    plan.append(f"  call {i}: kind nvidia-h200-x2, carry [\"{out}/part{i}\"] ({s / 2**20:.1f} MiB), command: {cmd}")
(out / "PLAN.txt").write_text("\n".join(plan) + "\n")
print("\n".join(plan))
EOF
