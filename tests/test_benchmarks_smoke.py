"""End-to-end smoke test of ``python -m benchmarks.run --quick``.

Checks that every section of results.json is present and holds finite, positive numbers, and
that RESULTS.md is written. No wall-clock value is asserted against a threshold: the numbers
of a quick run on a shared machine mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = (
    "full",
    "lora_qv",
    "peft_qv",
    "lora_all",
    "peft_all",
    "floor",
    "head_only",
    "lora_qv+unfused",
    "lora_all+unfused",
)

pytest.importorskip("peft")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_summary(s: dict, where: str) -> None:
    assert s["n"] >= 1, where
    for k in ("median", "p25", "p75", "min", "max"):
        assert positive(s[k]), f"{where}.{k} = {s.get(k)!r}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


def test_machine_and_load_recorded(quick_run):
    res, out = quick_run
    m = res["machine"]
    assert m["torch_threads"] == 1
    assert len(m["load_average_start"]) == 3 and len(res["load_average_end"]) == 3
    assert positive(res["elapsed_s"])
    text = (out / "RESULTS.md").read_text()
    for heading in (
        "## Machine",
        "## Goals",
        "## 1-2. Training step",
        "## 3. Inference",
        "## 4. Checkpoint sizes",
        "## 5. Injection",
    ):
        assert heading in text


def test_train_section(quick_run):
    res, _ = quick_run
    assert res["train"]
    for key, t in res["train"].items():
        for m in METHODS:
            row = t["speed"]["methods"][m]
            check_summary(row["step_s"], f"{key}.{m}.step_s")
            assert positive(row["total_params"]) and positive(row["trainable_params"])
            mem = t["memory"][m]
            assert "error" not in mem, mem.get("error")
            assert positive(mem["peak_bytes"]) and positive(mem["loaded_bytes"])
            assert mem["peak_bytes"] >= mem["loaded_bytes"]
        for name in (
            "lora_qv/full",
            "lora_all/full",
            "lora_qv/floor",
            "lora_all/floor",
            "lora_qv/peft_qv",
            "lora_all/peft_all",
        ):
            check_summary(t["speed"]["ratios"][name], f"{key}.{name}")
        # LoRA and PEFT adapt the same matrices: same trainable parameter count
        ms = t["speed"]["methods"]
        assert ms["lora_qv"]["trainable_params"] == ms["peft_qv"]["trainable_params"]
        assert ms["lora_all"]["trainable_params"] == ms["peft_all"]["trainable_params"]
        assert ms["full"]["trainable_params"] == ms["full"]["total_params"]


def test_inference_section(quick_run):
    res, _ = quick_run
    assert res["inference"]
    for key, inf in res["inference"].items():
        for variant in ("base", "merged", "merged_unloaded", "unmerged_qv", "unmerged_all"):
            check_summary(inf["latency_s"][variant], f"{key}.{variant}")
        for name, r in inf["ratios"].items():
            check_summary(r, f"{key}.{name}")
        # merging is exact up to round-off, and the adapter really changes the output
        assert inf["check"]["max_abs_diff_merged_vs_unmerged"] < 1e-4
        assert inf["check"]["max_abs_diff_unmerged_vs_base"] > 0


def test_sizes_section(quick_run):
    res, _ = quick_run
    sz = res["sizes"]
    for key, e in sz["models"].items():
        assert positive(e["full_checkpoint_bytes"])
        for name, a in e["adapters"].items():
            for k in (
                "closed_form_bytes",
                "tensor_bytes",
                "file_bytes",
                "header_and_metadata_bytes",
                "full_over_adapter_file",
            ):
                assert positive(a[k]), f"{key}.{name}.{k}"
            if "+head" not in name:
                assert a["tensor_bytes"] == a["closed_form_bytes"]
    g = sz["gpt3_175b"]
    assert g["adapter_params_meta"] == g["adapter_params_closed_form"] == 4 * (12288 + 12288) * 2 * 96
    assert positive(g["full_fp16_bytes"]) and 340e9 < g["full_fp16_bytes"] < 360e9


def test_inject_merge_section(quick_run):
    res, _ = quick_run
    im = res["inject_merge"]
    assert positive(im["params"])
    for label in ("q,v", "q,k,v,o", "all-linear"):
        check_summary(im["meta"][label]["inject_s"], f"meta.{label}")
        row = im["materialized"][label]
        for k in ("inject_s", "merge_s", "unmerge_s", "reference_addmm_merge_s"):
            check_summary(row[k], f"materialized.{label}.{k}")
        assert positive(row["merge_ns_per_adapted_element"]) and positive(row["adapted_weight_elements"])


def test_precision_section(quick_run):
    """fp32, bf16-mixed and bf16-base rows, each with memory; the bf16 base really is bf16."""
    res, out = quick_run
    pr = res["precision"]
    for m in (
        "lora_all",
        "lora_all+bf16mixed",
        "lora_all+bf16base",
        "floor",
        "floor+bf16mixed",
        "full",
        "full+bf16mixed",
    ):
        check_summary(pr["speed"]["methods"][m]["step_s"], f"precision.{m}")
        assert "error" not in pr["memory"][m], pr["memory"][m].get("error")
        assert positive(pr["memory"][m]["peak_bytes"])
    for m in ("lora_all+bf16mixed", "lora_all+bf16base", "full+bf16mixed"):
        check_summary(pr["speed"]["ratios"][f"{m}/{m.split('+')[0]}"], m)
    assert "## 9. bf16 on this CPU" in (out / "RESULTS.md").read_text()


def test_compile_section(quick_run):
    """torch.compile of the adapted model: no graph break in its forward, compile time and graph counts recorded."""
    res, out = quick_run
    c = res["compile"]
    assert c["graph_breaks"]["graph_break_count"] == 0, c["graph_breaks"]["reasons"]
    assert positive(c["compile_s"]) and c["graphs_first_step"] >= 1 and c["graphs_after_fit"] >= c["graphs_first_step"]
    check_summary(c["ratio_compiled_eager"], "compiled/eager")
    assert len(c["fit_step_s"]) == len(c["fit_seq_lengths"])
    assert "## 10. torch.compile" in (out / "RESULTS.md").read_text()


def test_main_job_throughput_smoke(tmp_path):
    """benchmarks/main_job.py on two real batches of the main job: every method timed, tokens counted."""
    from benchmarks.main_job import METHODS, main
    from benchmarks.run import main_job_section

    out = tmp_path / "mj.json"
    assert main(["--batches", "1", "--rounds", "1", "--warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert 0 < d["real_tokens"] <= d["padded_tokens"] and d["samples"] == 32
    for m in METHODS:
        assert positive(d["methods"][m]["real_tokens_per_s"]) and positive(d["methods"][m]["trainable_params"])
    ms = d["methods"]
    assert ms["head_only"]["trainable_params"] < ms["lora"]["trainable_params"] < ms["full"]["trainable_params"]
    assert "## 11. Tokens per second of the main job" in "\n".join(main_job_section(out))


def test_goals_have_verdicts(quick_run):
    res, _ = quick_run
    ids = {g["id"] for g in res["goals"]}
    assert {"1a", "1b", "1c", "1d", "2", "3", "4", "5a", "5b"} <= ids
    for g in res["goals"]:
        assert g["verdict"].startswith(("PASS", "MISS"))
        assert math.isfinite(g["measured"])


def test_generation_speed_smoke(tmp_path):
    """benchmarks/generation_speed.py at smoke size: the four paths generate the same tokens and the
    rendered table shows the measured throughputs."""
    pytest.importorskip("gguf")
    pytest.importorskip("peft")
    from benchmarks.generation_speed import main, render

    out = tmp_path / "gs.json"
    assert main(["--batches", "2", "--new-tokens", "3", "--rounds", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert set(res["tokens_equal_to_merged"].values()) == {1.0}
    table = "\n".join(render(out))
    base = 2 * 3 / res["median_s"]["base (no adapters)"]
    assert f"| 2 | {base:.1f} |" in table


def test_monitor_overhead_quick_times_the_monitored_steps_it_claims():
    """``python -m benchmarks.monitor_overhead --quick``: the monitored copy really runs the monitor's hooks (values
    logged at the cadence, both PNGs drawn at the epoch end), and every timing is finite and positive."""
    from benchmarks.monitor_overhead import main, render_data

    result = main(["--quick"])
    assert result["values_per_log"] > 50  # per-matrix and per-type values of the adapted matrices
    assert any(name.startswith("heatmap") for name in result["images"])
    assert (
        positive(result["step_s"]) and positive(result["ratio_on_off"]["median"]) and positive(result["job"]["ratio"])
    )
    assert len(result["samples_s"]["monitor on"]) == len(result["samples_s"]["monitor off"]) == result["rounds"]
    assert "LoRAMonitor overhead" in "\n".join(render_data(result))


def test_lora_fa_quick_measures_what_its_table_says(tmp_path):
    """``python -m benchmarks.lora_fa --quick``: LoRA-FA trains half of LoRA's parameters on the tiny model and keeps
    fewer activations than LoRA on the same matrices; every memory process reports; the section renders."""
    from benchmarks.lora_fa import METHODS, main, render_data

    data = main(["--quick", "--out", str(tmp_path / "lora_fa.json")])
    (model,) = data["models"].values()
    meth = model["methods"]
    assert list(meth) == METHODS
    for targets in ("qv", "all"):
        plain, fa = meth[f"lora_{targets}"], meth[f"lora_fa_{targets}"]
        assert fa["saved_activation_bytes"] < plain["saved_activation_bytes"]
        assert fa["trainable_params"] < plain["trainable_params"]
    assert all(positive(m["memory"]["training_bytes"]) for m in meth.values())
    assert "## 14. LoRA-FA" in "\n".join(render_data(data))


def test_main_job_ratio_quick_times_lora_full_limit_and_peft(tmp_path):
    """``python -m benchmarks.main_job_ratio --quick``: the main job's LoRA, full fine-tuning, frozen-base limit and
    PEFT passes are built with the job's settings (trainable counts in the expected order) and timed."""
    from benchmarks.main_job_ratio import main, render_data

    data = main(["--quick", "--out", str(tmp_path / "ratio.json")])
    passes = data["passes"]
    trainable = {k.split(" | ")[1]: v["trainable_params"] for k, v in passes.items()}
    assert trainable["lora"] == trainable["peft"] < trainable["full"]
    assert trainable["floor"] < trainable["lora"]
    assert all(positive(min(v["seconds"])) for v in passes.values())
    assert positive(data["ratios"]["main job"]["median"])
    assert "## 15. The main job's LoRA" in "\n".join(render_data(data))


def test_adapter_latency_quick_times_every_configuration(tmp_path):
    """``python -m benchmarks.adapter_latency --quick``: every configuration timed at the three settings on both model
    shapes; merged and unmerged LoRA compute the same logits; the adapters hold what their formula says; the table
    renders with the paper's overheads beside."""
    import json

    from benchmarks.adapter_latency import CONFIGS, main, render_data

    out = tmp_path / "adapter_latency.json"
    main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    for res in data["models"].values():
        assert list(res["settings"]) == ["32x512", "16x256", "1x128"]
        for s in res["settings"].values():
            assert set(s["seconds"]) == set(CONFIGS) and all(v["n"] == s["rounds"] for v in s["seconds"].values())
            assert s["merged_vs_unmerged_max_abs_logit_diff"] < 1e-3
            assert s["added_params"]["adapter_h"] > 0 and s["added_params"]["lora_unmerged"] > 0
    text = "\n".join(render_data(data))
    assert "| paper Adapter^H | paper Adapter^L |" in text and "+30.3%" in text and "+2.2%" in text
