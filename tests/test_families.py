"""The model-family matrix: each family's tiny model served by SGLang with LoRA on, trained, and synced by `lora`,
`disk` and `restart` in turn; after each sync the engine's logprobs on one fixed sampled conversation equal the
trainer's, and differ from the previous policy's (a sync that loaded nothing, or loaded a layer under a wrong name,
fails the first check; a step that changed nothing would pass it vacuously, hence the second).

Real SGLang and real models (tests/families.py builds them; nothing is downloaded). `ART_SGLANG_MATRIX_OUT=path`
writes what each family measured as JSON (docs/models.md is written from it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import art
import pytest
from families import BY_NAME, FAMILIES, build, describe
from rollouts import gather

from art_sglang import PolicyMismatchError, SGLangBackend, SGLangConfig, TrainerConfig
from art_sglang.config import ALL_LINEAR, Placement
from art_sglang.models import small_model
from art_sglang.sync import METHODS
from art_sglang.trainer.data import prepare

TOLERANCE = 1e-3  # fp32 engine vs fp32 trainer
MOVED = 10 * TOLERANCE  # how far each step must move the policy on the fixed conversation for the check to mean much
# What LoRA adapts, by the checkpoint's names: fused layers where the checkpoint fuses them; no experts.
ADAPTED = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
# `restart` serves the checkpoint's own tensors with `disk`'s merged layers: after `disk` passes for a family, only the
# layouts beyond Llama's can break it (fused layers, tied embeddings, Gemma's norms, experts). The Llama-like families
# (llama, qwen2, qwen3, mistral) skip its server restart, ~45 s each under the suite's load; Llama's own is
# test_backend.py's `restart` test (SmolLM2 is a Llama).
RESTARTED = {"gemma", "phi3", "qwen3_moe"}
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a fruit."},
]


@pytest.fixture(scope="module")
def family_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def _record(family: str, row: dict) -> None:
    out = os.environ.get("ART_SGLANG_MATRIX_OUT")
    if not out:
        return
    path = Path(out)
    rows = json.loads(path.read_text()) if path.is_file() else {}
    rows[family] = row
    path.write_text(json.dumps(rows, indent=2) + "\n")


def _backend(path: Path) -> SGLangBackend:
    return SGLangBackend(
        path=path,
        sglang_config=SGLangConfig(max_total_tokens=4096, weight_sync_method="lora", server_timeout=240),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
async def test_family_serves_trains_and_syncs_exactly(name, family_root, tmp_path):
    family = BY_NAME[name]
    model_dir = build(family, small_model(), family_root / name)
    model = art.TrainableModel(name=name, run_name=name, project="families", base_model=str(model_dir))
    row: dict = {**describe(model_dir), "what": family.what, "template": family.template}
    async with _backend(tmp_path) as backend:
        await model.register(backend)
        run = backend.model_run(model)
        row["tool_call_parser"] = run.server.tool_call_parser
        row["lora_targets"] = run.server.config.lora_target_modules  # the server's, and the trainer's
        assert row["lora_targets"] == ADAPTED.get(name, list(ALL_LINEAR))
        assert run.server.tool_call_parser == family.tool_call_parser

        # One conversation sampled once at step 0; every policy after it is scored on these same tokens.
        response = await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=CONVERSATION, max_tokens=12, temperature=1.0
        )
        fixed = art.Trajectory(messages_and_choices=[*CONVERSATION, response.choices[0]], reward=1.0)
        other = art.Trajectory(messages_and_choices=[*CONVERSATION, response.choices[0]], reward=0.0)
        sequence = prepare([art.TrajectoryGroup([fixed, other])], run.template).sequences[0]
        start = sequence.mask.index(True)

        async def gap_and_engine() -> tuple[float, list[float]]:
            # SGLang's prefill scoring on the route the gateway uses
            route = run.gateway.route(run.model.name)
            scored = await run.client.score(sequence.token_ids, start, lora_path=route.adapter)
            engine = [lp for lp, m in zip(scored, sequence.mask[start:], strict=True) if m]
            (trainer,) = await run.trainer.logprobs([sequence])
            assert len(engine) == len(trainer) > 0 and all(math.isfinite(lp) for lp in engine), engine
            return max(abs(a - b) for a, b in zip(engine, trainer, strict=True)), engine

        gap, previous = await gap_and_engine()
        row["step 0 gap"] = gap
        assert gap < TOLERANCE, (name, "base model", gap)

        for step, method in enumerate(("lora", "disk", "restart") if name in RESTARTED else ("lora", "disk"), 1):
            if run.sync.method != method:  # the same run, another sync method for this step
                run.sync = METHODS[method](run.sync.ctx)
            groups = await gather(model, ["Name a fruit.", "Name a colour."], group_size=3)
            for group in groups:  # distinct rewards: a random model's answers may all score alike, and teach nothing
                for i, trajectory in enumerate(group.trajectories):
                    trajectory.reward = float(i * i)  # 0, 1, 4: none at the mean
            result = await backend.train(model, groups, learning_rate=1e-2)
            assert result.metrics["data/trajectories_used"] == 6
            assert result.step == step
            gap, engine = await gap_and_engine()
            moved = sum(abs(a - b) for a, b in zip(engine, previous, strict=True)) / len(engine)
            row[method] = {"gap": gap, "moved": moved, "sync_seconds": result.metrics["sync/sync_seconds"]}
            assert moved > MOVED, (name, method, "the step did not change the policy enough to test the sync", moved)
            assert gap < TOLERANCE, (name, method, gap)
            previous = engine
    _record(name, row)


@pytest.mark.parametrize("mode", ["cpu", "shared"])
async def test_a_model_sglang_serves_otherwise_is_refused_at_start(mode, family_root, tmp_path):
    """Unsupported cell: SGLang's Qwen3-MoE ignores tie_word_embeddings (real Qwen3-MoE checkpoints are untied), so a
    tied one is served with an empty output layer. The backend finds it before any rollout and says so, in shared
    mode too (there the trainer scores its side before it leaves the GPU to the server; this CPU runs shared mode's
    stop/start flow)."""
    tied = dataclasses.replace(BY_NAME["qwen3_moe"], name="qwen3_moe_tied")
    tied = dataclasses.replace(tied, config={**tied.config, "tie_word_embeddings": True})
    model_dir = build(tied, small_model(), family_root / f"{tied.name}-{mode}")
    model = art.TrainableModel(name="tied", run_name="tied", project="families", base_model=str(model_dir))
    async with _backend(tmp_path) as backend:
        if mode == "shared":
            backend.placement = Placement("shared", None, [], "forced for this test")
        with pytest.raises(PolicyMismatchError, match="serves this model differently from transformers"):
            await model.register(backend)
    _record("qwen3_moe (tied embeddings)", {"refused at start": "PolicyMismatchError"})
