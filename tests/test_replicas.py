"""Two SGLang replicas behind the gateway, through ART's API, on this CPU (each replica and the trainer one thread:
throughput does not scale here; this is about exactness and failures, so the model is SmolLM2's shape at 2 layers of
random weights, tests/families.py's tiny_smollm2)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import art
import pytest
from rollouts import BASE, engine_logprobs, gather, training_sequences, wait_until

import art_sglang.backend as backend_module
from art_sglang import DeviceConfig, SGLangBackend, SGLangConfig, TrainerConfig
from art_sglang.errors import ConfigError, SGLangAPIError
from art_sglang.gateway.upstreams import affinity_key
from art_sglang.procs import alive, free_port, process_group_members
from art_sglang.server import ReplicaClient, ReplicaSet, SGLangClient
from art_sglang.server.external import check_server_args
from art_sglang.sync import METHODS, LoraSync
from art_sglang.tasks import ONE_WORD_INSTRUCTION, ONE_WORD_QUESTIONS
from art_sglang.trainer.data import prepare

QUESTIONS = ONE_WORD_QUESTIONS[:4]
# The servers run a 2-layer SmolLM2 of random weights (tests/families.py: tiny_smollm2): routing, syncs and faults are
# what is tested here, and its steps and samples cost little. A learning rate that moves its peaked policy measurably.
LR = 1e-2
LONG = 512  # tokens of a rollout that must still run when a replica is killed (the tiny model decodes fast)


def question_message(question: str) -> dict[str, str]:
    return {"role": "user", "content": question + ONE_WORD_INSTRUCTION}  # as one_word_rollout sends it


async def train_under_load(backend, model, groups, learning_rate: float = 1e-3):
    """`backend.train` while rollouts keep coming: none fails, and each reply carries the sampled logprobs of the
    policy its label names (the step before, scored by the trainer from its checkpoint, or the new one), so no
    replica answered as a version it did not hold."""
    run = backend.model_run(model)
    previous, trained = run.step, asyncio.Event()

    async def load() -> list:
        sent = []
        while True:
            last = trained.is_set()  # a batch begun after the step returned meets the new policy
            sent += await gather(model, QUESTIONS[:2], group_size=2, max_tokens=8)
            if last:
                return sent

    background = asyncio.create_task(load())
    try:
        result = await backend.train(model, groups, learning_rate=learning_rate)
    finally:
        trained.set()
    samples = [t for g in await asyncio.wait_for(background, timeout=300) for t in g.trajectories]
    for t in samples:  # the gateway's label (the route) is the engine's (the replica's own weights' version)
        assert str(t.messages_and_choices[-1].model_extra["weight_version"]) == t.metadata["weight_version"]
    labels = (str(result.step), str(previous))
    by_label = [[t for t in samples if t.metadata["weight_version"] == v] for v in labels]
    assert len(by_label[0]) + len(by_label[1]) == len(samples)
    assert by_label[0] and by_label[1], [len(v) for v in by_label]
    new, old = (training_sequences(run, [art.TrajectoryGroup(ts)]) for ts in by_label)
    now = await run.trainer.logprobs(new + old)
    await run.trainer.load_checkpoint(run.checkpoint(previous))
    before = await run.trainer.logprobs(new + old)
    await run.trainer.load_checkpoint(run.checkpoint(result.step))
    labelled = now[: len(new)] + before[len(new) :]  # the policy each sample's label names
    pairs = zip(new + old, labelled, strict=True)
    gaps = [max(abs(a - b) for a, b in zip(engine_logprobs(s), p, strict=True)) for s, p in pairs]
    assert max(gaps) < 1e-3, gaps
    # Most samples' two policies differ by more than that tolerance: a wrong label would show.
    apart = [max(abs(a - b) for a, b in zip(x, y, strict=True)) for x, y in zip(now, before, strict=True)]
    assert sum(d > 1e-3 for d in apart) > len(apart) / 2, apart
    return result


async def replicas_serve(run, groups) -> list[float]:
    """Each replica's version label, adapters and logprobs against the trainer's, on samples of `groups`: the largest
    |replica - trainer| gap of each replica (scored on each replica directly, not through the router)."""
    sync, client = run.sync, run.client
    assert sorted(client.admitted) == list(range(len(client.replicas)))
    lora = sync.current if isinstance(sync, LoraSync) else None  # `disk`, `restart`: merged weights, no adapter
    sequences = training_sequences(run, groups[:2])
    trainer = await run.trainer.logprobs(sequences)
    gaps = []
    for replica in client.replicas:
        assert (await replica.model_info())["weight_version"] == str(run.step)
        if lora is not None:
            assert sorted((await replica.models())[1:]) == sorted(sync.loaded.values())
        worst = 0.0
        for s, ours in zip(sequences, trainer, strict=True):
            positions = s.trained_positions()
            served = await replica.score(s.token_ids, positions[0], lora_path=lora)
            engine = [served[t - positions[0]] for t in positions]
            worst = max(worst, *(abs(a - b) for a, b in zip(engine, ours, strict=True)))
        gaps.append(worst)
    return gaps


async def conversations_that_begin_alike_spread_and_stay(model, upstreams) -> None:
    """32 two-turn conversations with one system prompt and one first message, at once: each replica serves 35-65% of
    the requests, and each second turn goes where its first reply was sampled (that replica's cache holds the whole
    first turn; the other's holds at most the shared start)."""
    client, sent = model.openai_client(), list(upstreams.sent)

    async def two_turns(k: int):
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name a color."},
        ]
        first = await client.chat.completions.create(model=model.get_inference_name(), messages=messages, max_tokens=8)
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": f"Another one, number {k}."},
        ]
        second = await client.chat.completions.create(model=model.get_inference_name(), messages=messages, max_tokens=4)
        return first.usage, second.usage

    usages = await asyncio.gather(*(two_turns(k) for k in range(32)))
    served = [now - before for now, before in zip(upstreams.sent, sent, strict=True)]
    assert sum(served) == 64 and all(0.35 <= n / 64 <= 0.65 for n in served), served
    for first, second in usages:
        cached = second.prompt_tokens_details.cached_tokens
        assert cached >= first.prompt_tokens + first.completion_tokens - 1, (first, second)


@pytest.mark.slow
async def test_two_replicas_train_in_step_and_survive_a_replica_crash(tmp_path, tiny_base):
    backend = SGLangBackend(
        path=tmp_path,
        sglang_config=SGLangConfig(max_total_tokens=16384, server_timeout=240, replicas=2),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )
    model = art.TrainableModel(name="twins", run_name="twins", project="tests", base_model=str(tiny_base))
    processes: set[int] = set()
    try:
        await model.register(backend)
        run = backend.model_run(model)
        replicas = run.server
        assert isinstance(replicas, ReplicaSet)
        upstreams = run.gateway.upstreams
        assert upstreams.urls == replicas.urls and len(set(replicas.urls)) == 2
        for i, s in enumerate(replicas.replicas):
            assert s.log_path.name == f"sglang-{i}.log" and s.log_path.is_file()
            processes |= process_group_members(s.pid)

        for step in (1, 2):
            groups = await gather(model, QUESTIONS)
            if step == 1:
                first = [g.model_copy(deep=True) for g in groups]
                result = await backend.train(model, groups, learning_rate=LR / 10)  # small enough to move one way
                assert sum(upstreams.sent) == 16, upstreams.sent  # each request sent once
                # It learned from them: the policy it serves now (checked against the trainer's below) gives this
                # batch's better-than-average answers more probability, against the worse ones, than the policy
                # that sampled them did. (Measured after this step, at a tenth of LR: at LR, and after two more
                # steps on other batches, it came out negative once in eight runs.)
                sequences = prepare(first, run.template).sequences
                now = await run.trainer.logprobs(sequences)
                pairs = zip(sequences, now, strict=True)
                moved = sum(s.advantage * (sum(lps) - sum(engine_logprobs(s))) for s, lps in pairs)
                assert sequences and moved > 0, moved
            else:  # while rollouts keep coming: none fails, none answered by another version than its label's
                result = await train_under_load(backend, model, groups, learning_rate=LR)
            assert result.step == step
            # The new policy is on every replica before anything is routed to it: same label, same adapters, and
            # each serves exactly the trainer's policy.
            gaps = await replicas_serve(run, groups)
            assert all(g < 1e-3 for g in gaps), gaps
        # Each question's conversation went to one replica, the questions to both; the samples of a group reused
        # their prompt's prefix on it.
        chosen = [upstreams._sticky[affinity_key({"messages": [question_message(q)]})] for q in QUESTIONS]
        assert sorted(set(chosen)) == [0, 1], chosen
        assert all(t.metrics["cached_tokens"] > 0 for g in groups for t in g.trajectories[1:])
        await conversations_that_begin_alike_spread_and_stay(model, upstreams)

        # SIGKILL one replica while 16 rollouts run: its requests go to the other; nothing fails.
        victim = replicas.replicas[0]
        old_pid = victim.pid
        rollouts = asyncio.create_task(gather(model, QUESTIONS, max_tokens=LONG, ignore_eos=True))
        await wait_until(lambda: sum(run.gateway.in_flight.values()) >= 8, what="rollouts in flight")
        await asyncio.sleep(0.2)
        cut_off = upstreams.busy[0]
        os.killpg(old_pid, signal.SIGKILL)
        await wait_until(lambda: 0 not in run.client.admitted, timeout=5, what="the dead replica taken out")
        groups = await asyncio.wait_for(rollouts, timeout=600)
        assert cut_off > 0  # the killed replica had requests running: they were sent again
        assert sum(len(g.trajectories) for g in groups) == 16
        assert {t.metadata["weight_version"] for g in groups for t in g.trajectories} == {"2"}
        # It comes back on the current policy before it takes requests again; the server as a whole never went down.
        await wait_until(
            lambda: victim.pid not in (None, old_pid) and 0 in run.client.admitted, timeout=400, what="rejoin"
        )
        assert run.restarts == 0 and replicas.restarts == 1 and run.gateway.held > 0
        processes |= process_group_members(victim.pid)
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps
        # The next step goes to both.
        groups = await gather(model, QUESTIONS)
        result = await backend.train(model, groups, learning_rate=LR)
        assert result.step == 3
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps
    finally:
        await backend.close()
    assert processes and not [p for p in processes if alive(p)]  # the replicas leave nothing behind


@pytest.mark.slow
async def test_two_replicas_take_merged_weights_under_load(tmp_path, tiny_base):
    """`disk` (all replicas updated under the gate), then `restart` (a rolling restart, the other replica serving) on
    the same replicas: rollouts sent throughout a step all complete, each carrying the logprobs of the policy its
    label names; after each step both replicas report it and serve the trainer's policy. Between the two `disk` steps
    a replica is killed mid-rollout and comes back on the served layers. (One run for both methods, as
    test_families.py switches them: each server start costs ~45 s here. Users choose one per backend.)"""
    backend = SGLangBackend(
        path=tmp_path,
        sglang_config=SGLangConfig(max_total_tokens=16384, server_timeout=240, replicas=2, weight_sync_method="disk"),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )
    model = art.TrainableModel(name="twins-merged", run_name="twins", project="tests", base_model=str(tiny_base))
    processes: set[int] = set()
    try:
        await model.register(backend)
        run = backend.model_run(model)
        replicas, gateway = run.server, run.gateway
        assert isinstance(replicas, ReplicaSet)
        for s in replicas.replicas:
            processes |= process_group_members(s.pid)

        # Step 1 (`disk`) while rollouts keep coming.
        groups = await gather(model, QUESTIONS)
        result = await train_under_load(backend, model, groups, learning_rate=LR)
        assert result.step == 1 and replicas.restarts == 0
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps

        # SIGKILL one replica while rollouts run: nothing is lost; it comes back on the base weights plus the served
        # layers. (A replica that dies under `restart` restarts the same way, on the served merged weights.)
        victim = replicas.replicas[0]
        old_pid = victim.pid
        rollouts = asyncio.create_task(gather(model, QUESTIONS, max_tokens=LONG, ignore_eos=True))
        await wait_until(lambda: gateway.upstreams.busy[0] > 0, what="rollouts on replica 0")
        os.killpg(old_pid, signal.SIGKILL)
        groups = await asyncio.wait_for(rollouts, timeout=600)
        assert sum(len(g.trajectories) for g in groups) == 16
        assert {t.metadata["weight_version"] for g in groups for t in g.trajectories} == {"1"}
        await wait_until(
            lambda: victim.pid not in (None, old_pid) and 0 in run.client.admitted, timeout=400, what="rejoin"
        )
        assert replicas.restarts == 1
        processes |= process_group_members(victim.pid)
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps

        # Step 2 (`disk`) goes to the other layers directory (the replica restarted above read step 1's).
        served = run.client.layers[0]
        result = await backend.train(model, groups, learning_rate=LR)
        assert result.step == 2 and run.restarts == 0
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps
        assert {Path(served).name, Path(run.client.layers[0]).name} == {"layers-a", "layers-b"}

        # Step 3 (`restart`): a rolling restart while rollouts keep coming.
        run.sync = METHODS["restart"](run.sync.ctx)
        groups = await gather(model, QUESTIONS)
        result = await train_under_load(backend, model, groups, learning_rate=LR)
        assert result.step == 3 and replicas.restarts == 1 and run.restarts == 0  # a roll's restarts are no crashes
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps
        for s in replicas.replicas:  # (the roll started new ones)
            processes |= process_group_members(s.pid)
    finally:
        await backend.close()
    assert processes and not [p for p in processes if alive(p)]


class FakeServer:
    """Fake (named as such): a replica that is up, for ReplicaClient's bookkeeping without a server."""

    def __init__(self, port: int) -> None:
        self.base_url, self.config = f"http://127.0.0.1:{port}", SGLangConfig()
        self.model_path = self.base_model_path = BASE
        self.log_path = Path("sglang-0.log")

    def crash_reason(self) -> None:
        return None


class FakeReplica:
    """Fake: a real server cannot be made to refuse a policy that the other replica takes."""

    def __init__(self) -> None:
        self.refuse = False
        self.versions: list[str] = []

    async def update_weight_version(self, version: str) -> None:
        if self.refuse:
            raise SGLangAPIError("/update_weight_version", 500, "refused")
        self.versions.append(version)


async def test_a_replica_that_refuses_a_policy_is_taken_out_for_a_restart():
    replicas = ReplicaSet([FakeServer(1), FakeServer(2)])
    replicas.client = client = ReplicaClient(replicas.replicas)
    unused, client.replicas = client.replicas, [FakeReplica(), FakeReplica()]
    good, bad = client.replicas
    try:
        bad.refuse = True
        await client.update_weight_version("3")  # the step goes on with the replica that took it
        assert good.versions == ["3"] and client.admitted == {0} and client.version == "3"
        assert replicas._down(1).startswith("it failed to take the new policy") and replicas._down(0) is None
        good.refuse = True  # none takes it: the sync fails
        with pytest.raises(SGLangAPIError, match="refused"):
            await client.update_weight_version("4")
        assert client.version == "3"  # what the replicas hold: a replica that comes back gets that
    finally:
        client.replicas = unused
        await client.aclose()


def test_replicas_refuse_what_they_cannot_do():
    for method in ("lora", "disk", "restart"):  # every sync (servers elsewhere: `lora` only, test_config)
        assert SGLangConfig(replicas=2, weight_sync_method=method).replicas == 2
    with pytest.raises(ConfigError, match="integer >= 1"):
        SGLangConfig(replicas=0)
    with pytest.raises(ConfigError, match="each takes a free port"):
        SGLangConfig(replicas=2, port=30000)


async def test_replicas_on_gpus_are_laid_out_by_device_config(tmp_path, monkeypatch):
    """On an 8-GPU machine (the GPU count is faked: this machine has none, and nothing is started): one server per
    tensor_parallel_size of inference_devices, each its own GPUs, log and port; what they cannot do is refused at
    register, before anything starts."""
    monkeypatch.setattr(backend_module, "gpu_count", lambda: 8)
    devices = DeviceConfig(inference_devices=[0, 1, 2, 3], training_devices=[4, 5, 6, 7], auto_detect=False)
    backend = SGLangBackend(path=tmp_path, device_config=devices, sglang_config=SGLangConfig(tensor_parallel_size=2))
    p = backend.placement
    assert (p.mode, p.servers, p.training_devices) == ("split", [[0, 1], [2, 3]], [4, 5, 6, 7])
    replicas = backend_module._new_server(BASE, backend.sglang_config, p.servers, tmp_path, "m", False, 0, None, 8)
    assert isinstance(replicas, ReplicaSet)
    for i, server in enumerate(replicas.replicas):
        assert server.environment()["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, p.servers[i]))
        server.port = 30000 + i
        command = server.command()
        assert command[command.index("--tp-size") + 1] == "2" and "--device" not in command
        assert server.log_path.name == f"sglang-{i}.log"

    model = art.TrainableModel(name="gpus", run_name="gpus", project="tests", base_model=BASE)
    fixed = SGLangBackend(path=tmp_path, device_config=devices, sglang_config=SGLangConfig(port=30000))
    with pytest.raises(ConfigError, match="None with 4 SGLang servers") as e:
        await model.register(fixed)
    assert e.value.field == "port" and not fixed._runs
    await fixed.close()
    await backend.close()


def test_what_a_server_elsewhere_lacks_is_named():
    cfg = SGLangConfig(lora_target_modules=["q_proj", "v_proj"], max_loras_per_batch=4)
    assert check_server_args({"enable_lora": False}, cfg, 8) == ["LoRA is off (--enable-lora)"]
    lacking = {"enable_lora": True, "max_lora_rank": 8, "lora_target_modules": ["q_proj"], "max_loras_per_batch": 2}
    problems = check_server_args(lacking, cfg, 16)
    assert "--max-lora-rank is 8, the adapters are of rank 16" in problems[0] and "lacks ['v_proj']" in problems[1]
    assert "--max-loras-per-batch is 2" in problems[2] and len(problems) == 3
    enough = {"enable_lora": True, "max_lora_rank": 8, "lora_target_modules": ["all"], "max_loras_per_batch": 4}
    assert check_server_args(enough, cfg, 8) == []  # rank 8 holds rank-8 adapters, whatever max_lora_rank says


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
async def test_a_server_started_elsewhere_is_attached_by_url(tmp_path, tiny_base):
    """`art-sglang serve` starts a server as another host would; the backend attaches it by URL (with an API key),
    trains through it, rides out an outage (the server's processes stopped: a hung or cut-off host), and leaves it
    running, without its adapters, when it closes."""
    port, key = free_port(), "elsewhere-key"
    command = [sys.executable, "-m", "art_sglang.cli", "serve", "--model", str(tiny_base), "--port", str(port)]
    command += ["--max-total-tokens", "16384", "--timeout", "240"]
    command += ["--log", str(tmp_path / "elsewhere.log")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "ART_SGLANG_API_KEY": key}
    serve = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    backend = SGLangBackend(
        path=tmp_path,
        sglang_config=SGLangConfig(servers=[url], api_key=key, server_timeout=240),
        trainer_config=TrainerConfig(lora_rank=8, lora_alpha=16),
    )
    model = art.TrainableModel(name="elsewhere", run_name="elsewhere", project="tests", base_model=str(tiny_base))
    try:
        await model.register(backend)  # waits for the server to answer, then checks it
        run = backend.model_run(model)
        assert isinstance(run.server, ReplicaSet) and run.server.urls == [url] and run.client.by_tensors
        assert run.gateway.served_model == tiny_base.name  # the name it serves under, as it reports it
        (server_group,) = children(serve.pid)  # SGLang, in its own process group under `serve`
        # The key reached SGLang (the backend's calls authenticate) but no command line, which `ps` shows to all.
        for pid in process_group_members(server_group) | {serve.pid}:
            assert key not in (Path("/proc") / str(pid) / "cmdline").read_text(), pid
        assert (tmp_path / "elsewhere.log").stat().st_mode & 0o077 == 0  # SGLang logs its arguments there
        groups = await gather(model, QUESTIONS)
        result = await backend.train(model, groups, learning_rate=LR)
        assert result.step == 1
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps
        # Every adapter went over HTTP as tensors, the first step's (read from its checkpoint) too: no path is sent.
        assert run.client.adapters and all(load.path is None for load in run.client.adapters.values())

        # An outage: it stops answering. It is taken out; requests wait; once it answers it is checked, given what it
        # lacks and taken back, and the requests complete on the current policy.
        os.killpg(server_group, signal.SIGSTOP)
        try:
            await wait_until(lambda: 0 not in run.client.admitted, timeout=30, what="the silent server taken out")
            rollouts = asyncio.create_task(gather(model, QUESTIONS[:2], group_size=2))
            await asyncio.sleep(2.0)
            assert not rollouts.done()
        finally:
            os.killpg(server_group, signal.SIGCONT)
        await wait_until(lambda: 0 in run.client.admitted, timeout=300, what="the server taken back")
        groups = await asyncio.wait_for(rollouts, timeout=300)
        assert {t.metadata["weight_version"] for g in groups for t in g.trajectories} == {"1"}
        assert run.restarts == 0 and run.gateway.held > 0
        gaps = await replicas_serve(run, groups)
        assert all(g < 1e-3 for g in gaps), gaps
    finally:
        await backend.close()
        try:
            # Closing the backend leaves the server running, without this backend's adapters.
            async with SGLangClient(url, api_key=key) as client:
                assert await client.health()
                assert [m for m in await client.models() if m.startswith("elsewhere-step")] == []
        finally:
            serve.send_signal(signal.SIGTERM)  # `serve` stops its server's process group, then exits
            assert serve.wait(timeout=120) == 0
            assert "serving at" in serve.stdout.read()
    assert not process_group_members(server_group) and not process_group_members(serve.pid)
