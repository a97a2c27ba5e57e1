"""`ContinualTrainer.push_to_hub` is `Trainer`'s: it reaches a Hub-compatible server and the model reloads from it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from hub_server import HubServer  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    from hf_adaptive import ContinualConfig, ContinualTrainer
    from hf_adaptive.models import build_tiny_gemma
    from hf_adaptive.tasks import CausalLMCollator, builtin_suite, tokenize_task

    out = sys.argv[1]
    model, tok = build_tiny_gemma()
    task = builtin_suite(["has_cat"], n_train=16, n_eval=8)[0]
    args = ContinualConfig(output_dir=out, max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True,
                           save_strategy="no", hub_model_id="alice/tiny-continual", hub_token="hf_test")
    trainer = ContinualTrainer(model=model, args=args, train_dataset=tokenize_task(task, tok),
                               data_collator=CausalLMCollator(tok), processing_class=tok)
    trainer.train()
    trainer.push_to_hub(commit_message="first push")
    again = AutoModelForCausalLM.from_pretrained("alice/tiny-continual", token="hf_test")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    print("ROUNDTRIP-OK")
    """
)


def test_push_to_hub_round_trip(tmp_path):
    server = HubServer(tmp_path / "hub").start()
    try:
        env = dict(
            os.environ,
            HF_ENDPOINT=server.endpoint,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(tmp_path / "hf_home"),
            OMP_NUM_THREADS="1",
            HF_HUB_DISABLE_XET="1",
        )
        env["PYTHONPATH"] = str(TESTS.parent) + os.pathsep + env.get("PYTHONPATH", "")
        script = tmp_path / "push.py"
        script.write_text(SCRIPT)
        out = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300
        )
        assert out.returncode == 0, out.stderr[-4000:]
        assert "ROUNDTRIP-OK" in out.stdout
        assert any(path.endswith("/commit/main") for _, path in server.requests)
    finally:
        server.stop()
