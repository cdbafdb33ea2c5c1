"""SGLangBackend: ART's `Backend` protocol over a managed SGLang server, a gateway and a trainer worker group.

Orchestration only: the server (server/), the gateway (gateway.py), the weight-sync methods (sync/) and the
trainer (trainer/) each do their own job. Several trainable models on one base model share one server (serving.py);
each has its own trainer, checkpoints, adapters and routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import art
from art import LocalTrainResult
from art.adapter_leases import pin_inference_target, pinned_inference_name, pinned_inference_step

from . import paths
from .chat import ChatTemplate, resolve_tool_call_parser
from .config import (
    DeviceConfig,
    Placement,
    SGLangConfig,
    TrainerConfig,
    check_servers,
    gpu_count,
    place,
    precision,
)
from .errors import ArtSGLangError, ConfigError, ModelNotFoundError
from .gateway import Gateway, Upstreams
from .internal_config import apply_internal_config
from .leases import Leases
from .models import lora_targets, resolve_base_model
from .server import ExternalServer, ReplicaSet, SGLangClient, SGLangServer
from .serving import Serving
from .step import ModelRun, TrainCall, publish, sft_step, train_step, write_atomic
from .sync import METHODS, GpuTimeShare, SyncContext
from .sync.check import check_served_policy, trainer_scores
from .trainer.core import StepOptions, TrainerSettings, restore_replaced
from .trainer.loss import LossConfig
from .trainer.worker import TrainerGroup

log = logging.getLogger("art_sglang")

# backend.train(...) keywords: ART's names. Those ART has that we do not implement are refused when set to a
# non-default value, so that no option is silently ignored.
_SUPPORTED = {
    "learning_rate",
    "loss_fn",
    "epsilon",
    "epsilon_high",
    "scale_rewards",
    "normalize_advantages",
    "importance_sampling_level",
    "kl_penalty_coef",
    "kl_penalty_source",
    "advantage_balance",
    "max_negative_advantage_importance_sampling_weight",
    "mask_prob_ratio",
    "kimi_k2_tau",
    "precalculate_logprobs",
    "truncated_importance_sampling",
    "allow_training_without_logprobs",
    "save_checkpoint",
    "verbose",
    "kl_penalty_reference_step",
    "kl_ref_adapter_path",
    "grad_accumulation_sequences",
    "num_trajectories_learning_rate_multiplier_power",
    "plot_tensors",
    "packed_sequence_length",
}
_ART_DEFAULTS: dict[str, Any] = {
    "loss_fn_config": None,  # ART's LocalBackend refuses these two as well
    "adam_params": None,
}
# Options with no effect in ART's LocalBackend either (read only by its Megatron backend, or by nothing), and the
# chunk size of the logprob pass, which changes memory, not values: accepted and, as there, without effect.
_NO_EFFECT = {
    "optimizer_save_interval",
    "final_training_step",
    "scale_learning_rate_by_reward_std_dev",
    "logprob_calculation_chunk_size",
}


SFT_BATCH_SIZE = 2  # ART's LocalBackend default for TrainSFTConfig(batch_size="auto")
SFT_LEARNING_RATE = 5e-5  # ART's TrainSFTConfig default


def _lora_targets(base: Path, wanted: Any) -> list[str] | None:
    """The trainer's LoRA targets under the checkpoint's names (None: a PEFT pattern string, left to PEFT)."""
    if not isinstance(wanted, list | tuple):
        return None
    targets, absent = lora_targets(base, list(wanted))
    if not targets:
        raise ConfigError("target_modules", list(wanted), f"names of linear layers in {base}; it has none of these")
    if absent:
        log.info(
            "art-sglang: LoRA adapts %s; %s has no other layer called %s (experts are never adapted)",
            targets,
            base.name,
            absent,
        )
    return targets


class SGLangBackend:
    """ART backend serving with SGLang and training a LoRA adapter.

    `SGLangBackend()` detects GPUs (none: CPU; one: shared mode; two or more: split mode). Explicit devices
    (`inference_device=0, training_devices=[1, 2, 3]`) or a `DeviceConfig` override detection.
    """

    def __init__(
        self,
        inference_device: int | None = None,
        training_devices: list[int] | None = None,
        *,
        device_config: DeviceConfig | None = None,
        sglang_config: SGLangConfig | None = None,
        trainer_config: TrainerConfig | None = None,
        path: str | os.PathLike[str] = paths.DEFAULT_ART_PATH,
        api_key: str | None = None,
        gateway_port: int = 0,
    ) -> None:
        if device_config is None:
            if inference_device is not None or training_devices is not None:
                device_config = DeviceConfig(
                    0 if inference_device is None else inference_device,
                    [1] if training_devices is None else list(training_devices),
                    auto_detect=False,
                )
            else:
                device_config = DeviceConfig()
        self.device_config = device_config
        self.sglang_config = sglang_config or SGLangConfig()
        self.trainer_config = trainer_config or TrainerConfig()
        self.placement: Placement = _place(device_config, self.sglang_config)
        self._path = str(path)
        self.api_key = api_key
        self.gateway_port = gateway_port
        self._runs: dict[str, ModelRun] = {}
        self._serving: Serving | None = None  # the server every model is served by
        self._starting = asyncio.Lock()  # models start one at a time: the first starts the server

    async def __aenter__(self) -> SGLangBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- ART's protocol ---------------------------------------------------------------------------------
    async def register(self, model: art.Model) -> None:
        model.base_path = self._path
        model_dir = paths.model_dir_of(model, self._path)
        model_dir.mkdir(parents=True, exist_ok=True)
        dump = model.safe_model_dump() if hasattr(model, "safe_model_dump") else model.model_dump()
        write_atomic(model_dir / "model.json", json.dumps(dump, default=str))

    def _model_inference_name(self, model: art.Model, step: int | None = None) -> str:
        if (pinned := pinned_inference_name(model.name, step)) is not None:  # inside an adapter lease
            return pinned
        if step is None:
            step = pinned_inference_step(model.name)
        run = self._runs.get(paths.run_key(model))
        if step is None and run is not None and run.sync.method != "lora":
            # One policy on the server (`disk`, `restart`): only `name` always answers; each reply's weight_version
            # says which step sampled it. A `name@step` would be refused once the next sync replaces that step.
            return model.name
        if step is None:
            step = run.step if run is not None else _latest_step(paths.model_dir_of(model, self._path))
        return f"{model.name}@{step or 0}"

    # -- ART 0.5.23's adapter leases (PipelineTrainer): a held step is served by its own weights -------------
    @contextlib.asynccontextmanager
    async def exact_adapter_lease(self, model: art.TrainableModel, step: int) -> AsyncIterator[None]:
        """Serve `name@step` with step's own adapter while the block runs (loaded from its checkpoint if it is no
        longer on the server); `model.get_inference_name()` names it. LeaseError when that cannot be done (or the
        server's own error, if loading fails there)."""
        run = await self._ensure_run(model)
        with run.leases.hold(step):
            await run.sync.serve(step)
            async with pin_inference_target(model.name, step=step, inference_name=f"{model.name}@{step}"):
                yield

    @contextlib.asynccontextmanager
    async def adapter_lease(self, model: art.TrainableModel, step: int) -> AsyncIterator[None]:
        """PipelineTrainer's rollout lease: as `exact_adapter_lease` with the `lora` sync. With `disk` or `restart`
        (one policy on the server) the rollouts ask for `name`, the newest step, and each reply's weight_version
        says which step sampled it."""
        run = await self._ensure_run(model)
        if run.sync.method == "lora":
            async with self.exact_adapter_lease(model, step):
                yield
            return
        async with pin_inference_target(model.name, step=step, inference_name=model.name):
            yield

    @contextlib.asynccontextmanager
    async def adapter_retention_lease(self, model: art.TrainableModel, step: int) -> AsyncIterator[None]:
        """Keep step's adapter loaded, if it is, while the block runs (it is not loaded for this)."""
        run = await self._ensure_run(model)
        with run.leases.hold(step):
            yield

    async def prune_model_adapters(self, model: art.TrainableModel, *, retain_steps: set[int]) -> None:
        """Unload the adapters of steps outside `retain_steps` that no lease or request holds (the newest two
        steps stay)."""
        run = self._runs.get(paths.run_key(model))
        if run is not None:
            await run.sync.prune(set(retain_steps))

    async def _get_step(self, model: art.TrainableModel) -> int:
        run = self._runs.get(paths.run_key(model))
        if run is not None:
            return run.step
        return _latest_step(paths.model_dir_of(model, self._path)) or 0

    async def _delete_checkpoint_files(self, model: art.TrainableModel, steps_to_keep: list[int]) -> None:
        """Delete the checkpoints of other steps than `steps_to_keep`, the current step and leased steps (a server
        restart loads a leased step's adapter from its checkpoint)."""
        keep = set(steps_to_keep) | {await self._get_step(model)}
        if (run := self._runs.get(paths.run_key(model))) is not None:
            keep |= run.leases.held()
        model_dir = paths.model_dir_of(model, self._path)
        for step in paths.checkpoint_steps(model_dir):
            if step not in keep:
                shutil.rmtree(paths.checkpoint_dir(model_dir, step), ignore_errors=True)

    async def _experimental_fork_checkpoint(
        self,
        model: art.Model,
        from_model: str,
        from_project: str | None = None,
        from_s3_bucket: str | None = None,
        not_after_step: int | None = None,
        verbose: bool = False,
        prefix: str | None = None,
    ) -> None:
        """Start `model` from another model's local checkpoint, as ART does: its latest one (or the latest not after
        `not_after_step`) is copied under the same step, and `model` resumes there. Call before `model.register`."""
        if from_s3_bucket is not None:
            raise ArtSGLangError(
                "forking from S3 is not supported (nothing is downloaded at run time): copy the checkpoint into "
                f"{self._path}/<project>/models/<run_name>/checkpoints/<step> and fork without from_s3_bucket"
            )
        if paths.run_key(model) in self._runs:
            raise ArtSGLangError(f"fork into {model.name!r} before it trains: its server already serves a policy")
        source_dir = paths.model_dir(from_project or model.project, from_model, self._path)
        source = source_dir / "checkpoints"
        steps = paths.checkpoint_steps(source_dir)
        eligible = [s for s in steps if not_after_step is None or s <= not_after_step]
        if not eligible:
            limit = "" if not_after_step is None else f" at or before step {not_after_step}"
            raise ModelNotFoundError(f"no checkpoint{limit} in {source} (steps there: {steps or 'none'})")
        step = eligible[-1]
        _check_checkpoint(paths.checkpoint_dir(source_dir, step))
        target_dir = paths.model_dir_of(model, self._path)
        existing = _latest_step(target_dir)
        if existing is not None and existing >= step:
            raise ArtSGLangError(
                f"{model.name!r} already has step {existing}, at or after the forked step {step}: it would resume "
                "there, not from the fork. Fork into a new model name."
            )
        target = paths.checkpoint_dir(target_dir, step)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.fork-", dir=target.parent))
        try:
            shutil.copytree(paths.checkpoint_dir(source_dir, step), tmp, dirs_exist_ok=True)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if verbose:
            print(f"[art-sglang] forked {from_model} step {step} into {model.name}")

    async def _prepare_backend_for_training(self, model: art.TrainableModel, config: Any = None) -> tuple[str, str]:
        run = await self._ensure_run(model)
        return run.gateway.base_url, self.api_key or "art-sglang"

    async def _train_sft(
        self,
        model: art.TrainableModel,
        trajectories: Any,
        config: Any = None,
        dev_config: Any = None,
        verbose: bool = False,
    ) -> AsyncIterator[dict[str, float]]:
        """Supervised fine-tuning as ART's LocalBackend does it (`model.train_sft`): the assistant turns of
        `trajectories`, `config.batch_size` at a time (ART's default 2), one optimizer step per batch at its learning
        rate. All batches make one new step, published and checkpointed like an RL step (all or nothing). Yields
        each batch's metrics once the step is published."""
        batch_size = getattr(config, "batch_size", "auto")
        batch_size = SFT_BATCH_SIZE if batch_size == "auto" else batch_size
        learning_rate = getattr(config, "learning_rate", SFT_LEARNING_RATE)
        last_only = getattr(config, "assistant_turns", "all") == "last"  # ART 0.5.23
        run = await self._ensure_run(model)
        trajectories = list(trajectories)
        async with run.lock:
            max_length = run.trainer_config.max_sequence_length
            result, batches = await sft_step(run, trajectories, learning_rate, batch_size, max_length, last_only)
        if verbose:
            print(f"[art-sglang] SFT step {result.step}: {len(batches)} batches, loss {result.metrics['loss']:.4f}")
        data = {k: v for k, v in result.metrics.items() if k.startswith("data/")}
        for batch in batches:
            yield {
                "loss/train": batch["loss"],
                "loss/learning_rate": batch["learning_rate"],
                "loss/grad_norm": batch["grad_norm"],
                "data/step_num_trajectories": float(len(trajectories)),
                "data/step_trainable_assistant_tokens": result.metrics["tokens"],
                "data/step_num_dropped_trajectories": data.get("data/trajectories_dropped_overlong", 0.0),
                "data/step_num_gradient_steps": float(len(batches)),
            }

    async def train(self, model: art.TrainableModel, trajectory_groups: Any, **kwargs: Any) -> LocalTrainResult:
        """One RL step: save the trajectories, validate and tokenize, train, checkpoint, and put the new policy on
        the server. All or nothing: on failure the model stays at its last step (see step.py). Calls for one
        model run one after another."""
        run = await self._ensure_run(model)
        call = self._train_options(kwargs, run.trainer_config)
        groups = list(trajectory_groups)
        async with run.lock:
            return await train_step(run, groups, call)

    def model_run(self, model: art.Model) -> ModelRun:
        """What was started for a registered model (its server, gateway, trainer, sync) and its current step."""
        run = self._runs.get(paths.run_key(model))
        if run is None:
            raise ArtSGLangError(f"model {model.name!r} is not registered with this backend: await model.register()")
        return run

    async def close(self) -> None:
        """Stop everything this backend started: the server, the gateway, trainer workers."""
        runs, self._runs = list(self._runs.values()), {}
        serving, self._serving = self._serving, None
        if serving is not None:
            await serving.close()
        for run in runs:
            await run.trainer.shutdown()
            shutil.rmtree(run.merged_root, ignore_errors=True)

    # -- start-up ---------------------------------------------------------------------------------------
    def _train_options(self, kwargs: dict[str, Any], tc: TrainerConfig | None = None) -> TrainCall:
        """`train()`'s keywords checked; `tc`: the model's TrainerConfig (the backend's when not given)."""
        tc = tc or self.trainer_config
        for key, value in kwargs.items():
            if key in _SUPPORTED or key in _NO_EFFECT:
                continue
            if key in _ART_DEFAULTS:
                if value != _ART_DEFAULTS[key]:
                    raise ConfigError(key, value, f"ART's LocalBackend requires {key}={_ART_DEFAULTS[key]!r}, as we do")
                continue
            raise ConfigError(key, value, f"unknown train() option; supported: {', '.join(sorted(_SUPPORTED))}")
        scale = kwargs.get("scale_rewards", True) and kwargs.get("normalize_advantages", True)
        lr = kwargs.get("learning_rate", 5e-6)
        if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
            raise ConfigError("learning_rate", lr, "a number > 0")
        try:
            loss = LossConfig(
                loss_fn=kwargs.get("loss_fn", "cispo"),
                epsilon=kwargs.get("epsilon"),
                epsilon_high=kwargs.get("epsilon_high"),
                importance_sampling_level=kwargs.get("importance_sampling_level", "token"),
                kl_penalty_coef=float(kwargs.get("kl_penalty_coef", 0.0)),
                kl_penalty_source=kwargs.get("kl_penalty_source", "current_learner"),
                max_negative_advantage_importance_sampling_weight=kwargs.get(
                    "max_negative_advantage_importance_sampling_weight"
                ),
                mask_prob_ratio=bool(kwargs.get("mask_prob_ratio", False)),
                kimi_k2_tau=kwargs.get("kimi_k2_tau"),
                truncated_importance_sampling=kwargs.get("truncated_importance_sampling"),
            )
        except ValueError as e:
            raise ConfigError("train()", kwargs, str(e)) from None
        balance_value = kwargs.get("advantage_balance", 0.0)
        if not isinstance(balance_value, int | float) or isinstance(balance_value, bool) or abs(balance_value) > 1:
            raise ConfigError("advantage_balance", balance_value, "a number from -1 to 1 (0: off)")
        precalculate = bool(kwargs.get("precalculate_logprobs", False))
        if loss.truncated_importance_sampling and not precalculate:  # ART 0.5.23 warns and skips it
            raise ConfigError(
                "truncated_importance_sampling",
                loss.truncated_importance_sampling,
                "it corrects between the sampler's and the precalculated logprobs: pass precalculate_logprobs=True",
            )
        packed_length = _optional_int(kwargs, "packed_sequence_length", 2)  # as ART: longer ones are dropped
        reference_step = _optional_int(kwargs, "kl_penalty_reference_step", 0)
        reference_path = kwargs.get("kl_ref_adapter_path")
        if reference_path is not None and not isinstance(reference_path, str | os.PathLike):
            raise ConfigError("kl_ref_adapter_path", reference_path, "None or a directory holding a LoRA adapter")
        if loss.kl_penalty_coef <= 0:  # as ART: the reference is only read for a KL penalty
            reference_step = reference_path = None
        # ART's LocalBackend rows hold one trajectory each, so (trajectories per row) ** power is 1 whatever the
        # power (its code computes 0 ** power there, see docs/art-compatibility.md): accepted, checked, no effect.
        power = kwargs.get("num_trajectories_learning_rate_multiplier_power", 0.0)
        if not isinstance(power, int | float) or isinstance(power, bool):
            raise ConfigError("num_trajectories_learning_rate_multiplier_power", power, "a number")
        lengths = [n for n in (tc.max_sequence_length, packed_length) if n is not None]
        prep = {
            "scale_rewards": bool(scale),
            "allow_training_without_logprobs": bool(kwargs.get("allow_training_without_logprobs", False)),
            "max_length": min(lengths) if lengths else None,
            "overlong": "skip" if packed_length is not None else tc.overlong,
            "advantage_balance": float(balance_value),
        }
        options = StepOptions(
            float(lr),
            loss,
            kl_reference=None if reference_path is None else str(reference_path),
            precalculate_logprobs=precalculate,
            grad_accumulation_sequences=_optional_int(kwargs, "grad_accumulation_sequences", 1) or 1,
        )
        plot = bool(kwargs.get("plot_tensors", False))
        if plot and importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("plot_tensors", True, "it needs matplotlib: pip install 'art-sglang[demo]'")
        save = bool(kwargs.get("save_checkpoint", True))
        return TrainCall(options, prep, save, reference_step, plot)

    async def _ensure_run(self, model: art.TrainableModel) -> ModelRun:
        key = paths.run_key(model)  # as ART's storage: two projects may each have a model of one name
        if key in self._runs:
            return self._runs[key]
        if not getattr(model, "trainable", False):
            raise ArtSGLangError(f"model {model.name!r} is not trainable: SGLangBackend serves art.TrainableModel")
        async with self._starting:
            if key not in self._runs:
                self._runs[key] = await self._start(model)
        return self._runs[key]

    async def _start(self, model: art.TrainableModel) -> ModelRun:
        applied = apply_internal_config(
            getattr(model, "_internal_config", None),
            self.sglang_config,
            self.trainer_config,
            self.device_config,
            lora_config=getattr(model, "lora_config", None),
        )
        cfg, tc = applied.sglang, applied.trainer
        p = self.placement
        if _placed_by(applied.devices, cfg) != _placed_by(self.device_config, self.sglang_config):  # ART's GPU ids
            p = _place(applied.devices, cfg)
        model_dir = paths.model_dir_of(model, self._path)
        model_dir.mkdir(parents=True, exist_ok=True)
        base = resolve_base_model(model.base_model)
        if (model_dir / "checkpoints").is_dir():
            restore_replaced(model_dir / "checkpoints")  # a save cut off by a crash
        step = _latest_step(model_dir)
        if step is not None:
            _check_checkpoint(paths.checkpoint_dir(model_dir, step))
        template = ChatTemplate.load(base, cfg.chat_template)
        parser = resolve_tool_call_parser(cfg.tool_call_parser, template.source, base.name)
        peft_args = dict(applied.peft_args)
        targets = _lora_targets(base, tc.target_modules)
        if targets is not None:
            peft_args["target_modules"] = targets
        server_dtype, trainer_dtype = precision(
            cfg.dtype,
            tc.dtype,
            server_on_gpu=bool(p.servers),  # each server's GPUs; none on the CPU or elsewhere
            trainer_on_gpu=bool(p.training_devices),
        )
        if server_dtype != trainer_dtype and not cfg.servers:
            log.warning(
                "art-sglang: the server runs %s and the trainer %s (SGLangConfig.dtype, TrainerConfig.dtype): the "
                "engine's logprobs will differ from the trainer's; leave one of them 'auto' to follow the other",
                server_dtype,
                trainer_dtype,
            )
        tc = dataclasses.replace(tc, dtype=trainer_dtype)
        server_cfg = SGLangConfig(
            **{
                **vars(cfg),
                "dtype": server_dtype,
                "lora_target_modules": cfg.lora_target_modules or targets or ["all"],
            }
        )
        memory_saver = cfg.enable_memory_saver
        if memory_saver is None:  # needs a GPU (and torch-memory-saver, which sglang[srt] brings)
            memory_saver = p.mode == "shared" and p.inference_device is not None
        key = _serving_key(base, server_cfg, parser, p, memory_saver)
        gpus = _server_gpus(server_cfg, p)  # refused here, before anything starts
        shared = self._serving
        if shared is not None:
            _check_can_share(shared, key, model.name)
            if (other := shared.runs.get(model.name)) is not None:
                raise ArtSGLangError(
                    f"a model named {model.name!r} (project {other.model.project!r}, run {other.model_dir.name!r}) is "
                    f"already served by this backend, and its server routes requests by model name: give the model "
                    f"of project {model.project!r} another name, or register it with another SGLangBackend."
                )
        settings = TrainerSettings.from_config(
            str(base), tc, peft_args=peft_args, threads=tc.cpu_threads if p.mode == "cpu" else None
        )
        trainer = TrainerGroup(
            settings, devices=p.training_devices, log_dir=model_dir / "logs", cpu_threads=tc.cpu_threads
        )
        if shared is None:
            log.info(
                "art-sglang: mode %s (%s); weight sync %s; tool-call parser %s; precision: server %s, trainer %s",
                p.mode,
                p.reason,
                cfg.weight_sync_method,
                parser,
                server_dtype,
                trainer_dtype,
            )
        else:
            log.info("art-sglang: %s shares the server of %s", model.name, ", ".join(shared.runs))
        serving, server, run, merged_root = shared, None, None, None
        expected: list[float] | None = None  # the trainer's scores for the policy check, when taken before it
        try:
            if shared is not None:  # the server runs: only this model's trainer starts
                await trainer.start()
                step = await self._first_checkpoint(trainer, model_dir, step)
            else:
                server = _new_server(
                    base, server_cfg, gpus, model_dir, model.name, memory_saver, step or 0, parser, tc.lora_rank
                )
                if p.mode == "shared":
                    # One GPU: the trainer loads, then moves to CPU memory, and only then does the server start, so
                    # that it sizes its KV pool from the memory the trainer left.
                    await trainer.start()
                    step = await self._first_checkpoint(trainer, model_dir, step)
                    expected = await trainer_scores(trainer, template)  # the policy check's side, while on the GPU
                    await trainer.offload()
                    await server.start()
                else:  # side by side: both are mostly imports and loading
                    results = await asyncio.gather(trainer.start(), server.start(), return_exceptions=True)
                    if errors := [r for r in results if isinstance(r, BaseException)]:
                        raise errors[0]
                    step = await self._first_checkpoint(trainer, model_dir, step)
                if isinstance(server, ReplicaSet):
                    client = server.client
                else:
                    client = SGLangClient(server.base_url, api_key=cfg.api_key)
                serving = Serving(
                    key,
                    server,
                    client,
                    self._gateway(base, cfg, server.served_model_name or model.name, server),
                )
                serving.gateway.start()
            merged_root = _merged_root(model)
            leases = Leases()
            ctx = SyncContext(
                model.name,
                serving.server,
                serving.client,
                serving.gateway,
                trainer,
                server_cfg,
                merged_root,
                model_dir,
                leases,
            )
            method = cfg.weight_sync_method
            if method == "lora" and not (await serving.client.server_info()).get("enable_lora"):
                log.warning("art-sglang: this server cannot serve LoRA adapters; weight sync falls back to 'disk'")
                method = "disk"
            timeshare = None
            if p.mode == "shared":
                timeshare = GpuTimeShare(serving.server, serving.client, trainer)
                log.info("art-sglang: shared mode: %s", await timeshare.check())
            run = ModelRun(
                model=model,
                model_dir=model_dir,
                base=base,
                template=template,
                trainer=trainer,
                serving=serving,
                sync=METHODS[method](ctx),
                timeshare=timeshare,
                step=step,
                merged_root=merged_root,
                leases=leases,
                trainer_config=tc,
            )
            serving.runs[model.name] = run  # from now on a server restart publishes it again
            async with run.publishing:
                await publish(run, step)
                gap = await check_served_policy(ctx, template, expected)
                log.info("art-sglang: the server serves the trainer's policy (mean logprob gap %.1e)", gap)
        except BaseException:
            await trainer.shutdown()
            if shared is None and serving is not None:
                await serving.close()
            elif shared is None and server is not None:
                await asyncio.to_thread(server.stop)
            elif run is not None:  # the other models keep the server; this one leaves nothing on it
                shared.runs.pop(model.name, None)
                shared.gateway.remove_route(model.name)
                with contextlib.suppress(Exception):
                    await run.sync.retire()
            if merged_root is not None:
                shutil.rmtree(merged_root, ignore_errors=True)
            raise
        self._serving = serving
        self.placement = p
        serving.watch()
        return run

    def _gateway(self, base: Path, cfg: SGLangConfig, served_model: str, server: SGLangServer | ReplicaSet) -> Gateway:
        upstream = Upstreams(server.urls, server.available) if isinstance(server, ReplicaSet) else server.base_url
        return Gateway(
            upstream,
            served_model,
            template=ChatTemplate.load(base, cfg.chat_template),
            port=self.gateway_port,
            api_key=self.api_key,
            upstream_api_key=cfg.api_key,
            hold_timeout=max(600.0, cfg.server_timeout * 2),
            server_log=str(server.log_path),
            max_running_requests=cfg.max_running_requests,
        )

    @staticmethod
    async def _first_checkpoint(trainer: TrainerGroup, model_dir: Path, step: int | None) -> int:
        """Resume from the latest checkpoint, or save step 0 (the untrained adapter)."""
        if step is None:
            await trainer.save_checkpoint(paths.checkpoint_dir(model_dir, 0), 0)
            return 0
        await trainer.load_checkpoint(paths.checkpoint_dir(model_dir, step))
        return step


# -- small helpers --------------------------------------------------------------------------------------------
def _placed_by(devices: DeviceConfig, cfg: SGLangConfig) -> tuple[Any, ...]:
    """What the placement depends on."""
    return devices, cfg.replicas, cfg.tensor_parallel_size, cfg.data_parallel_size, bool(cfg.servers)


def _place(devices: DeviceConfig, cfg: SGLangConfig) -> Placement:
    return place(
        devices,
        gpu_count(),
        replicas=cfg.replicas,
        tensor_parallel_size=cfg.tensor_parallel_size,
        data_parallel_size=cfg.data_parallel_size,
        serving_elsewhere=bool(cfg.servers),
    )


def _new_server(
    base: Path,
    cfg: SGLangConfig,
    gpus: list[list[int] | None],
    model_dir: Path,
    name: str,
    memory_saver: bool,
    step: int,
    parser: str | None,
    lora_rank: int,
) -> SGLangServer | ReplicaSet:
    """The model's SGLang server, or its replicas (each with its own GPUs, port and log)."""

    def server(device: list[int] | None, log_path: Path) -> SGLangServer:
        return SGLangServer(
            base,
            cfg,
            log_path=log_path,
            device=device,
            enable_lora=True,
            served_model_name=name,
            memory_saver=memory_saver,
            weight_version=str(step),
            tool_call_parser=parser,
        )

    if cfg.servers:  # started elsewhere: attached, never started or stopped here
        log_path = paths.server_log(model_dir)
        return ReplicaSet([ExternalServer(u, cfg, lora_rank=lora_rank, log_path=log_path) for u in cfg.servers])
    if len(gpus) == 1:
        return server(gpus[0], paths.server_log(model_dir))
    return ReplicaSet([server(g, paths.replica_log(model_dir, i)) for i, g in enumerate(gpus)])


def _server_gpus(cfg: SGLangConfig, p: Placement) -> list[list[int] | None]:
    """Each SGLang server's GPUs (None: the CPU): one per GPU group, or `cfg.replicas` on the CPU; none started here
    when the servers run elsewhere."""
    if cfg.servers:
        return []
    gpus: list[list[int] | None] = [None] * cfg.replicas if p.mode == "cpu" else list(p.servers or [None])
    check_servers(cfg, len(gpus))
    return gpus


def _serving_key(base: Path, cfg: SGLangConfig, parser: str | None, p: Placement, memory_saver: bool) -> dict[str, Any]:
    """What a model must match to be served by a running server, one entry per setting."""
    return {
        "base model": str(base),
        "tool-call parser": parser,
        "mode": p.mode,
        "serving GPUs": p.servers,
        "memory saver": memory_saver,
        **{f"SGLangConfig.{k}": v for k, v in vars(cfg).items()},
    }


def _check_can_share(serving: Serving, key: dict[str, Any], name: str) -> None:
    """A second model shares the running server, or gets an error that says why it cannot."""
    first = next(iter(serving.runs))
    mine = serving.key
    methods = sorted({run.sync.method for run in serving.runs.values()})  # as run: `lora` may have fallen back
    if methods != ["lora"] or mine["mode"] not in ("cpu", "split"):
        raise ArtSGLangError(
            f"{name!r} cannot share the SGLang server of {first!r}: several models on one server need the 'lora' "
            f"weight sync (each model's adapters side by side) in cpu or split mode; this server runs "
            f"{', '.join(methods)!s} in {mine['mode']} mode. Use one SGLangBackend per model."
        )
    if differ := [k for k in key if key[k] != mine.get(k)]:
        details = "; ".join(f"{k}: {key[k]!r} (server: {mine.get(k)!r})" for k in differ)
        raise ArtSGLangError(
            f"{name!r} cannot share the SGLang server of {first!r}: one server serves one base model with one set "
            f"of server settings, and these differ: {details}. Give both models the same settings, or use one "
            "SGLangBackend per model."
        )


def _latest_step(model_dir: Path) -> int | None:
    steps = paths.checkpoint_steps(model_dir)
    return steps[-1] if steps else None


def _check_checkpoint(directory: Path) -> None:
    problems = [n for n in ("adapter_config.json", "adapter_model.safetensors") if not (directory / n).is_file()]
    if not problems:
        try:
            json.loads((directory / "adapter_config.json").read_text())
        except ValueError:
            problems.append("adapter_config.json is not valid JSON")
        from safetensors import safe_open

        try:
            with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a bad header
            problems.append(f"adapter_model.safetensors cannot be read ({e})")
    if problems:
        raise ArtSGLangError(
            f"checkpoint {directory} is incomplete or corrupt ({', '.join(problems)}). Delete that directory to "
            "resume from the step before it."
        )


def _merged_root(model: art.Model) -> Path:
    """Merged exports go to a RAM disk when there is one."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    path = root / f"art-sglang-{model.project}-{model.name}-{secrets.token_hex(4)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _optional_int(kwargs: dict[str, Any], key: str, minimum: int) -> int | None:
    value = kwargs.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ConfigError(key, value, f"None or an integer >= {minimum}")
    return value


__all__ = ["SGLangBackend", "resolve_base_model"]
