#!/usr/bin/env bash
# Build a virtual environment holding this project and t5x, installed from source trees, then
# (with --test) run the project's t5x tests inside it with skipping turned into failure.
#
# t5x is not on PyPI and its setup.py pins GitHub URLs (airio, jestimator, clu, flax, optax,
# seqio). We install the PyPI releases of everything that has one, then t5x, airio and jestimator
# from source trees the user provides, each with --no-deps. Nothing is downloaded from GitHub and
# no t5x code enters this repository.
#
# Usage (from anywhere; the project is the checkout this script lives in):
#   T5X_SRC=/src/t5x AIRIO_SRC=/src/airio JESTIMATOR_SRC=/src/jestimator \
#     bash tools/t5x_env.sh [--venv DIR] [--test [PYTEST_ARGS...]]
# Each *_SRC is a source tree (a git clone or an unpacked archive) or a git directory without a
# work tree (its HEAD is exported with `git archive`). --venv defaults to .venv-t5x in the
# checkout (ignored by git). Re-running reuses the environment and only reinstalls the trees.
#
# Versions seen working together (2026-12-02, Python 3.11, CPU): t5x cc342d4 (2026-04-21),
# airio 69897df, jestimator 326824a, jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint
# 0.12.x, seqio 0.0.20, tensorflow-cpu 2.21, grain, fiddle, tensorstore, chex from PyPI.
set -euo pipefail

project=$(cd "$(dirname "$0")/.." && pwd)
venv="$project/.venv-t5x"
run_tests=0
pytest_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv=$(realpath -m "$2"); shift 2 ;;
    --test) run_tests=1; shift; pytest_args=("$@"); break ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "t5x_env.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for var in T5X_SRC AIRIO_SRC JESTIMATOR_SRC; do
  if [[ -z "${!var:-}" ]]; then
    echo "t5x_env.sh: set $var to a source tree or git directory of ${var%_SRC} (see --help)" >&2
    exit 2
  fi
  if [[ ! -d "${!var}" ]]; then
    echo "t5x_env.sh: $var=${!var} is not a directory" >&2
    exit 2
  fi
done

# A source tree as a folder with setup.py / pyproject.toml: itself, or HEAD of a git directory
# exported into the environment's src/.
export_tree() {  # name, path
  local name=$1 path=$2 out="$venv/src/$1"
  if [[ -f "$path/setup.py" || -f "$path/pyproject.toml" ]]; then
    echo "$path"
    return
  fi
  if git --git-dir="$path" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    rm -rf "$out" && mkdir -p "$out"
    # Snapshots may lack large blobs (test data): check out every file present through a
    # temporary index, leaving the absent ones out rather than failing.
    local sha file missing=() index="$venv/src/.index-$name"
    while IFS=$'\t' read -r sha file; do
      git --git-dir="$path" cat-file -e "$sha" 2>/dev/null || missing+=("$file")
    done < <(git --git-dir="$path" ls-tree -r HEAD --format=$'%(objectname)\t%(path)')
    GIT_INDEX_FILE=$index git --git-dir="$path" read-tree HEAD
    [[ ${#missing[@]} == 0 ]] ||
      GIT_INDEX_FILE=$index git --git-dir="$path" update-index --force-remove -- "${missing[@]}"
    GIT_INDEX_FILE=$index git --git-dir="$path" checkout-index -a -f --prefix="$out/" ||
      { echo "t5x_env.sh: could not export $path" >&2; exit 1; }
    rm -f "$index"
    [[ ${#missing[@]} == 0 ]] ||
      echo "t5x_env.sh: $name: absent from the snapshot, left out: ${missing[*]}" >&2
    git --git-dir="$path" log -1 --format='%h %cs' > "$out/.exported_from_commit"
    echo "$out"
    return
  fi
  echo "t5x_env.sh: $path has no setup.py / pyproject.toml and is not a git directory" >&2
  exit 2
}

if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
t5x_tree=$(export_tree t5x "$T5X_SRC") || exit 1
airio_tree=$(export_tree airio "$AIRIO_SRC") || exit 1
jestimator_tree=$(export_tree jestimator "$JESTIMATOR_SRC") || exit 1

# The project with its test extras (jax, flax, optax, orbax, seqio, tensorflow-cpu, clu, torch),
# then t5x's and airio's dependencies that PyPI has, unpinned so the project's versions win.
python -m pip install -q -e "$project[test]"
python -m pip install -q absl-py cached_property chex fiddle jaxtyping tensorstore grain \
  flit_core
python -m pip install -q --no-deps --no-build-isolation "$jestimator_tree" "$airio_tree" "$t5x_tree"

python - <<'EOF'
import importlib.metadata as md
import jax, flax, optax, seqio, t5x, t5x.contrib.moe.partitioning
print('t5x env:', ', '.join(f'{p} {md.version(p)}' for p in (
    't5x', 'airio', 'jestimator', 'jax', 'flax', 'optax', 'orbax-checkpoint', 'seqio',
    'tensorflow-cpu', 'grain', 'fiddle', 'clu')))
EOF
for tree in "$t5x_tree" "$airio_tree" "$jestimator_tree"; do
  [[ -f "$tree/.exported_from_commit" ]] && echo "  $(basename "$tree") from $(cat "$tree/.exported_from_commit")"
done
echo "t5x env ready: source $venv/bin/activate"

if [[ $run_tests == 1 ]]; then
  cd "$project"
  # Without t5x these tests skip; here a skip would hide a failure, so it is one.
  if [[ ${#pytest_args[@]} == 0 ]]; then
    pytest_args=(-n 0 -v -s tests/t5x_adapter_test.py tests/t5x_binaries_test.py
                 tests/fsdp_test.py::test_t5x_moe_partitioner_with_fsdp_splits_weights_and_adam_moments)
  fi
  UNIMOE_REQUIRE_T5X=1 python -m pytest -p no:cacheprovider "${pytest_args[@]}"
fi
