"""`make demo`: the whole midfill journey on one machine, with the YAML a cluster would take.

1. `midfill apply -f manifests/samples/trainingrun-debug.yaml --wait` trains the debug recipe on the
   Python standard library (torchrun through torchx's local scheduler, a progress bar), and the
   trainer registers the model in MLflow (SQLite under the state dir).
2. `midfill approve fim-debug --version N` does what a reviewer does in the MLflow UI.
3. `midfill apply -f manifests/samples/modelrelease.yaml --wait` serves the approved version on a
   local Ray Serve.
4. Real infill requests through the `openai` package (completions with `suffix`).

Running it again is safe: a finished TrainingRun is not retrained, approving is idempotent, and a
running release is left as it is. The endpoint is left running (the output says how to stop it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIDFILL = str(Path(sys.executable).parent / "midfill")
TRAINING_YAML = ROOT / "manifests" / "samples" / "trainingrun-debug.yaml"
RELEASE_YAML = ROOT / "manifests" / "samples" / "modelrelease.yaml"
TRAINING_TIMEOUT_S = 1800
SERVING_TIMEOUT_S = 600

# (prefix, suffix): the model writes the line between them. Held-out-style single-line holes inside
# function bodies, cut where an editor's cursor sits (after the indentation), in the standard
# library's own style: what the debug recipe trained on and what line-em scores.
EXAMPLES = [
    (
        "import os\n\n\ndef python_files(folder):\n    found = []\n    for name in os.listdir(folder):\n"
        '        if name.endswith(".py"):\n            ',
        "\n    return found\n",
    ),
    (
        "class Stack:\n    def __init__(self):\n        ",
        "\n\n    def push(self, item):\n        self.items.append(item)\n",
    ),
    (
        'def read_text(path, encoding="utf-8"):\n    with open(path, encoding=encoding) as f:\n        ',
        "\n",
    ),
]
LINE_EM = ("stop_rate", "stop_string_rate", "length_rate", "whitespace_rate", "first_line_exact_match", "tasks")


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def midfill(*args: str, capture: bool = False) -> str:
    """Run the real CLI (its output, progress bar included, goes to the terminal unless captured)."""
    print("$ midfill " + " ".join(args), flush=True)
    proc = subprocess.run([MIDFILL, *args], cwd=ROOT, text=True, capture_output=capture)
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout + proc.stderr)
        sys.exit(f"demo: `midfill {' '.join(args)}` failed (exit {proc.returncode}); see the messages above")
    return proc.stdout if capture else ""


def demo_key(key_file: Path) -> str:
    """A fresh key named `demo` (the file keeps only digests, so a rerun replaces the one it made before)."""
    from midfill.apikeys import KeyFile

    keys = KeyFile(key_file)
    if any(k.name == "demo" for k in keys.keys()):
        keys.revoke("demo")
    key = keys.create("demo")
    time.sleep(4)  # the running replica re-reads its keys every 3 s (serving.auth.KeyStore.RECHECK_S)
    return key


def get(kind: str, name: str) -> dict:
    return json.loads(midfill("get", kind, name, "-o", "json", capture=True))


def print_scores(model: str, version: str) -> None:
    """What the three examples do not show: line-em on held-out files, recorded on the version."""
    from midfill.registry import Registry, metric_tag_key
    from midfill.settings import CoreSettings

    tags = Registry(CoreSettings().resolved_tracking_uri()).get(model, version=version).tags
    got = {m: float(tags[metric_tag_key("line-em", m)]) for m in LINE_EM if metric_tag_key("line-em", m) in tags}
    if len(got) < len(LINE_EM):
        print(
            "\n(line-em was not recorded on this version; run: .venv/bin/midfill eval "
            f"models:/{model}/{version} --suite line-em)"
        )
        return
    print(
        f"""
\033[1mHow good is it?\033[0m line-em on {got["tasks"]:.0f} single-line holes inside function bodies of held-out
standard-library files (greedy, cursor after the indentation, like the examples above):
  ended the line itself (<eom>) {got["stop_rate"]:.0%} | cut by the client's newline stop \
{got["stop_string_rate"]:.0%} | ran to max tokens {got["length_rate"]:.0%}
  only whitespace {got["whitespace_rate"]:.0%} | first line exactly right {got["first_line_exact_match"]:.0%}
Judge the model by these numbers, not by three examples: a 5M-parameter model after at most 10 minutes on
2 CPU cores is weak (targets and measurements: docs/benchmarks.md, line_infill_ablation)."""
    )


def main() -> int:
    state_dir = Path(os.environ.get("MIDFILL_STATE_DIR", ROOT / ".midfill")).resolve()
    os.environ["MIDFILL_STATE_DIR"] = str(state_dir)
    print(f"midfill demo: state dir {state_dir} (resources, logs, checkpoints, MLflow store, API keys)")

    step("1/4 Train the debug recipe on the Python standard library (at most 10 minutes of training)")
    midfill("apply", "-f", str(TRAINING_YAML), "--wait", "--timeout", str(TRAINING_TIMEOUT_S))
    run = get("tr", "fim-debug")
    registered = run["status"]["registeredModel"]
    model, version = registered["name"], registered["version"]
    midfill("get", "tr")
    midfill("describe", "tr", "fim-debug")  # status, conditions and the line-em score recorded on the version

    step(f"2/4 Approve {registered['uri']} (a reviewer does this in the MLflow UI)")
    midfill("approve", model, "--version", version)

    step("3/4 Release the approved version on a local Ray Serve")
    midfill("apply", "-f", str(RELEASE_YAML), "--wait", "--timeout", str(SERVING_TIMEOUT_S))
    release = get("mr", "fim-debug")
    status = release["status"]
    if status.get("phase") != "Available":
        sys.exit(f"demo: the release is {status.get('phase')}: {status.get('message')}")
    midfill("get", "mr")
    ref = release["spec"]["auth"]["apiKeySecretRef"]
    key_file = state_dir / "secrets" / ref["name"] / ref.get("key", "api-keys")
    key = demo_key(key_file)

    step("4/4 Infill requests through the openai client (completions with `suffix`)")
    from openai import OpenAI

    client = OpenAI(base_url=status["url"] + "/v1", api_key=key, timeout=120, max_retries=2)
    for prefix, suffix in EXAMPLES:
        started = time.monotonic()
        # No stop strings: finish_reason "stop" here means the model ended the middle with its own <eom>.
        answer = client.completions.create(model=model, prompt=prefix, suffix=suffix, max_tokens=32, temperature=0)
        seconds = time.monotonic() - started
        print("\n\033[2m--- prefix ---\033[0m\n" + prefix + "\033[2m<cursor>\033[0m")
        print("\033[2m--- suffix ---\033[0m" + suffix)
        reason = answer.choices[0].finish_reason
        ended = "the model ended it itself" if reason == "stop" else "cut at max_tokens"
        print(f"\033[2m--- completion ({answer.usage.completion_tokens} tokens, {seconds:.1f} s, {ended}) ---\033[0m")
        text = answer.choices[0].text
        print("\033[32m" + text + "\033[0m" if text.strip() else f"(only whitespace: {text!r})")
    print_scores(model, version)

    print(
        f"""
\033[1mWhere to look next\033[0m
  YAML applied:      {TRAINING_YAML.relative_to(ROOT)}  and  {RELEASE_YAML.relative_to(ROOT)}
                     (the same files work with `kubectl apply` on a cluster with the operator)
  Endpoint:          {status["url"]}/v1  (OpenAI completions API base URL; model "{model}", version
                     {status.get("stableVersion")})
  API key:           {key}  (named 'demo'; {key_file}, the stand-in for Secret {ref["name"]}, holds its digest;
                     `midfill keys create|list|revoke NAME` manages keys, `midfill usage` shows who used them)
  MLflow UI:         .venv/bin/midfill ui   -> http://127.0.0.1:5000 (runs, metrics, model versions, approvals)
  Status:            .venv/bin/midfill get tr ; .venv/bin/midfill describe mr fim-debug
  Logs:              .venv/bin/midfill logs fim-debug --kind tr   (training)  /  --kind mr  (serving)
  Try it:            curl {status["url"]}/v1/completions -H "Authorization: Bearer {key}" \\
                       -H 'content-type: application/json' \\
                       -d '{{"prompt": "def add(a, b):\\n    ", "suffix": "\\n", "max_tokens": 16}}'

The endpoint is LEFT RUNNING. Stop it with:  .venv/bin/midfill delete mr fim-debug
(Training state, checkpoints and the registry stay in {state_dir}; `make demo` again reuses them.)"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
