"""All or nothing for checkpoints and copies (issue 12, items 3 and 4).

A bad state dict or AdamW state raises ``ValueError`` naming the group, parameter and key at
fault, and leaves model and optimizer bit-identical (every load here would change them: the
state dicts come from another run). A deep copy or pickle of (model, optimizer) continues
bit-identically to the original.
"""

import copy
import pickle

import pytest
import torch

import step_kernels as sk
from helpers import assert_same, snapshot, tiny_gpt
from step_kernels import ops
from test_optimizer import train_step

BACKENDS = ["reference"] + (["cpu"] if ops.backend_status("cpu", torch.device("cpu")) is None else [])
SWITCH = 2
# (group, index) of the last target and of the last parameter of tiny_gpt's sparse_param_groups.
LAST_TARGET, LAST_OTHER = (0, 3), (1, 11)  # blocks.0.fc2.weight [32, 128], ln_f.bias [32]


def make(seed=0, dtype=torch.float32, backend="reference", **kwargs):
    model = tiny_gpt(dtype, seed=seed)
    opt = sk.STEP(sk.sparse_param_groups(model), lr=3e-3, weight_decay=0.01, switch=kwargs.pop("switch", SWITCH),
                  backend=backend, **kwargs)
    return model, opt


def trained(steps, seed=0, dtype=torch.float32, backend="reference", **kwargs):
    model, opt = make(seed, dtype, backend, **kwargs)
    for step in range(steps):
        train_step(model, opt, step + 100 * seed, "cpu")
    return model, opt


@pytest.fixture(scope="module")
def sources():
    """Runs to load from, by (phase, dtype): past the switch (3 steps) or in phase 1 (1 step)."""
    return {(phase, dtype): trained(3 if phase == "sparse" else 1, seed=1, dtype=dtype)
            for phase in ("sparse", "dense") for dtype in (torch.float32, torch.bfloat16)}


# ---------------------------------------------------------------------------------------------
# load_state_dict
# ---------------------------------------------------------------------------------------------


def assert_same_run(a, b):
    """Snapshots of two optimizers (so the ids of their params differ) are bit-identical."""
    for key in ("params", "buffers", "state", "param_groups"):
        assert_same(a[key], b[key], key)


def entry(sd, where):
    gi, i = where
    return sd["state"][sd["param_groups"][gi]["params"][i]]


def set_group(gi, key, value):
    def mutate(sd):
        sd["param_groups"][gi][key] = value
        return sd
    return mutate


def set_global(key, value):
    def mutate(sd):
        for group in sd["param_groups"]:
            group[key] = value
        return sd
    return mutate


def set_state(where, key, make_value):
    def mutate(sd):
        entry(sd, where)[key] = make_value(entry(sd, where).get(key))
        return sd
    return mutate


def drop_state(where, key):
    def mutate(sd):
        del entry(sd, where)[key]
        return sd
    return mutate


def drop_top(key):
    def mutate(sd):
        del sd[key]
        return sd
    return mutate


def drop_group_key(gi, key):
    def mutate(sd):
        del sd["param_groups"][gi][key]
        return sd
    return mutate


def drop_param(gi):
    def mutate(sd):
        sd["state"].pop(sd["param_groups"][gi]["params"].pop())
        return sd
    return mutate


def duplicate_id(sd):
    sd["param_groups"][1]["params"][-1] = sd["param_groups"][1]["params"][0]
    return sd


def stray_state(sd):
    sd["state"][999] = copy.deepcopy(entry(sd, LAST_OTHER))
    return sd


def entry_not_a_dict(sd):
    sd["state"][sd["param_groups"][1]["params"][-1]] = [1]
    return sd


def drop_entry(sd):
    del sd["state"][sd["param_groups"][1]["params"][-1]]
    return sd


def precond_in_phase1(sd):
    target = entry(sd, LAST_TARGET)
    target["precond"] = torch.ones_like(target.pop("exp_avg_sq"))
    return sd


def non_contiguous(t):
    """The same values in a non-contiguous layout."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    spread = torch.empty(2 * t.numel(), dtype=t.dtype)[::2]
    return spread.copy_(t)


FP32, BF16 = torch.float32, torch.bfloat16
FC2, LN_F = r"blocks\.0\.fc2\.weight", r"ln_f\.bias"
# (id, phase of the source run, model dtype, how the state dict is broken, what the error says)
BAD_STATE_DICTS = [
    ("not_a_mapping", "sparse", FP32, lambda sd: [sd], r"state_dict must be a mapping"),
    ("no_state", "sparse", FP32, drop_top("state"), r"state dict has no 'state'"),
    ("state_not_a_dict", "sparse", FP32, lambda sd: dict(sd, state=[1]), r"'state' must map param ids to dicts"),
    ("entry_not_a_dict", "sparse", FP32, entry_not_a_dict, r"'state' must map param ids to dicts"),
    ("fewer_groups", "sparse", FP32, lambda sd: dict(sd, param_groups=sd["param_groups"][:1]),
     r"state dict has 1 param groups, this optimizer has 2"),
    ("group_without_lr", "sparse", FP32, drop_group_key(1, "lr"), r"param_groups\[1\]: state dict has no 'lr'"),
    ("group_without_phase", "sparse", FP32, drop_group_key(1, "phase"),
     r"param_groups\[1\]: state dict has no 'phase'"),
    ("betas_of_one", "sparse", FP32, set_group(1, "betas", (1.0, 0.999)), r"param_groups\[1\]: betas must be"),
    ("lr_nan", "sparse", FP32, set_group(0, "lr", float("nan")), r"param_groups\[0\]: lr must be"),
    ("weight_decay_negative", "sparse", FP32, set_group(1, "weight_decay", -0.1),
     r"param_groups\[1\]: weight_decay must be"),
    ("other_recipe", "sparse", FP32, set_global("recipe", "srste"),
     r"param_groups\[0\]: state dict is from recipe 'srste', this optimizer runs 'step'"),
    ("other_sparsity", "sparse", FP32, set_group(0, "sparsity", "1:4"),
     r"param_groups\[0\]: state dict has sparsity='1:4', this optimizer has sparsity='2:4'"),
    ("other_nm_dim", "sparse", FP32, set_group(0, "nm_dim", 0), r"param_groups\[0\]: state dict has nm_dim=0"),
    ("fewer_params", "sparse", FP32, drop_param(1),
     r"param_groups\[1\]: state dict has 11 params, this optimizer has 12"),
    ("step_negative", "sparse", FP32, set_global("step", -1), r"step must be an int >= 0, got -1"),
    ("step_float", "sparse", FP32, set_global("step", 3.0), r"step must be an int >= 0, got 3\.0"),
    ("step_differs_between_groups", "sparse", FP32, set_group(1, "step", 2),
     r"param_groups\[1\]: state dict has step=2, param_groups\[0\] has 3"),
    ("phase_unknown", "sparse", FP32, set_global("phase", "masked"), r"phase must be one of \('dense', 'sparse'\)"),
    ("sparse_without_switch_step", "sparse", FP32, set_global("switch_step", None),
     r"switch_step must be an int in \[1, step=3\]"),
    ("switch_after_step", "sparse", FP32, set_global("switch_step", 7), r"switch_step must be an int in \[1, step=3\]"),
    ("dense_with_switch_step", "dense", FP32, set_global("switch_step", 1),
     r"switch_step is 1 but the phase is 'dense'"),
    ("floor_count_negative", "sparse", FP32, set_global("precond_floor_count", -1), r"precond_floor_count must be"),
    ("z_history_not_a_list", "dense", FP32, set_global("z_history", 0.5), r"z_history must be a list"),
    ("duplicate_param_id", "sparse", FP32, duplicate_id, r"lists a param id in more than one place"),
    ("stray_state", "sparse", FP32, stray_state, r"state for param id 999, which no param group lists"),
    ("master_wrong_shape", "sparse", FP32, set_state(LAST_TARGET, "master", lambda t: t[:, :64]),
     FC2 + r": state 'master' has shape \(32, 64\), param has \(32, 128\)"),
    ("phase2_without_master", "sparse", FP32, drop_state(LAST_TARGET, "master"),
     FC2 + r": state dict has no 'master', which a target in phase 'sparse' of recipe 'step' needs"),
    ("phase2_without_precond", "sparse", FP32, drop_state(LAST_TARGET, "precond"),
     FC2 + r": state dict has no 'precond', which a target in phase 'sparse'"),
    ("phase2_with_live_v", "sparse", FP32, set_state(LAST_TARGET, "exp_avg_sq", lambda _: torch.zeros(32, 128)),
     FC2 + r": state dict has 'exp_avg_sq', which a target in phase 'sparse' of recipe 'step' does not hold"),
    ("phase1_with_precond", "dense", FP32, precond_in_phase1,
     FC2 + r": state dict has no 'exp_avg_sq', which a target in phase 'dense'"),
    ("float64_exp_avg", "sparse", FP32, set_state(LAST_TARGET, "exp_avg", lambda t: t.double()),
     FC2 + r": state 'exp_avg' has dtype torch\.float64, expected torch\.float32"),
    ("fp16_precond", "sparse", FP32, set_state(LAST_TARGET, "precond", lambda t: t.half()),
     FC2 + r": state 'precond' has dtype torch\.float16, expected torch\.float32 \(this optimizer's precond_dtype\)"),
    ("bf16_precond_for_fp32_optimizer", "sparse", FP32, set_state(LAST_TARGET, "precond", lambda t: t.bfloat16()),
     FC2 + r": state 'precond' has dtype torch\.bfloat16"),
    ("bf16_master", "sparse", FP32, set_state(LAST_TARGET, "master", lambda t: t.bfloat16()),
     FC2 + r": state 'master' has dtype torch\.bfloat16, expected torch\.float32"),
    ("precond_on_non_target", "sparse", FP32, set_state(LAST_OTHER, "precond", lambda _: torch.ones(32)),
     LN_F + r": state dict has 'precond', which a parameter that is not a target"),
    ("non_target_without_v", "sparse", FP32, drop_state(LAST_OTHER, "exp_avg_sq"),
     LN_F + r": state dict has no 'exp_avg_sq'"),
    ("last_param_wrong_shape", "sparse", FP32, set_state(LAST_OTHER, "exp_avg", lambda t: t[:3]),
     LN_F + r": state 'exp_avg' has shape \(3,\), param has \(32,\)"),
    ("adamw_step_tensor", "sparse", FP32, set_state(LAST_OTHER, "step", lambda _: torch.tensor(3.0)),
     LN_F + r": state 'step' must be an int >= 0, got tensor"),
    ("unknown_key", "sparse", FP32, set_state(LAST_OTHER, "max_exp_avg_sq", lambda _: torch.zeros(1)),
     LN_F + r": state dict has unknown state 'max_exp_avg_sq'"),
    ("not_a_tensor", "sparse", FP32, set_state(LAST_OTHER, "exp_avg", lambda t: t.tolist()),
     LN_F + r": state 'exp_avg' must be a tensor, got list"),
    ("meta_tensor", "sparse", FP32, set_state(LAST_OTHER, "exp_avg", lambda t: t.to("meta")),
     LN_F + r": state 'exp_avg' is on the meta device"),
    ("missing_entry", "sparse", FP32, drop_entry, LN_F + r": state dict has no 'exp_avg'"),
    ("bf16_model_without_master", "dense", BF16, drop_state(LAST_OTHER, "master"),
     LN_F + r": state dict has no 'master', which a parameter that is not a target in phase 'dense'"),
    ("bf16_model_bf16_exp_avg", "sparse", BF16, set_state(LAST_OTHER, "exp_avg", lambda t: t.bfloat16()),
     LN_F + r": state 'exp_avg' has dtype torch\.bfloat16, expected torch\.float32"),
]


@pytest.mark.parametrize("case", BAD_STATE_DICTS, ids=[case[0] for case in BAD_STATE_DICTS])
def test_bad_state_dict_raises_and_changes_nothing(case, sources):
    _, phase, dtype, mutate, match = case
    model, opt = trained(1, dtype=dtype)
    before = snapshot(model, opt)
    bad = mutate(copy.deepcopy(sources[phase, dtype][1].state_dict()))
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_same(snapshot(model, opt), before)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("phase", ["sparse", "dense"])
def test_good_state_dict_loads_exactly(phase, dtype, sources):
    """The control of the test above: the unbroken state dicts load, change the optimizer, and
    leave it with exactly the source run's state and groups."""
    source_model, source_opt = sources[phase, dtype]
    model, opt = trained(1, dtype=dtype)
    before = snapshot(model, opt)
    opt.load_state_dict(copy.deepcopy(source_opt.state_dict()))
    after, expected = snapshot(model, opt), snapshot(source_model, source_opt)
    with pytest.raises(AssertionError):
        assert_same(after["state"], before["state"])
    model.load_state_dict(source_model.state_dict())
    assert_same_run(snapshot(model, opt), expected)
    assert opt.phase == phase and opt.step_count == source_opt.step_count


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_state_loads_contiguous_and_resumes(backend):
    """State tensors in another layout (same values) load into contiguous ones and continue
    exactly as the plain state dict does, also on the cpu backend, which needs contiguous
    state."""
    source_model, source_opt = trained(3, seed=1, backend=backend)
    plain = copy.deepcopy(source_opt.state_dict())
    twisted = copy.deepcopy(plain)
    for state in twisted["state"].values():
        for key in state:
            if isinstance(state[key], torch.Tensor):
                state[key] = non_contiguous(state[key])
    assert not entry(twisted, LAST_TARGET)["precond"].is_contiguous()
    runs = []
    for sd in (plain, twisted):
        model, opt = make(seed=5, backend=backend)
        model.load_state_dict(source_model.state_dict())
        opt.load_state_dict(sd)
        assert all(t.is_contiguous() for state in opt.state.values() for t in state.values()
                   if isinstance(t, torch.Tensor))
        for step in range(3, 5):
            train_step(model, opt, step, "cpu")
        runs.append(snapshot(model, opt))
    assert_same_run(runs[1], runs[0])


def test_load_runs_torch_hooks_and_checks_what_the_pre_hook_returns(sources):
    """torch's load-state-dict pre-hooks run first (the checks see what they return), post-hooks
    after a successful load."""
    model, opt = trained(1)
    renamed = copy.deepcopy(sources["sparse", FP32][1].state_dict())
    for state in renamed["state"].values():
        state["m"] = state.pop("exp_avg")
    with pytest.raises(ValueError, match=r"blocks\.0\.qkv\.weight: state dict has unknown state 'm'"):
        opt.load_state_dict(copy.deepcopy(renamed))
    calls = []

    def rename_back(optimizer, state_dict):
        state_dict["state"] = {pid: {("exp_avg" if k == "m" else k): v for k, v in s.items()}
                               for pid, s in state_dict["state"].items()}
        return state_dict

    opt.register_load_state_dict_pre_hook(rename_back)
    opt.register_load_state_dict_post_hook(lambda optimizer: calls.append(optimizer.phase))
    opt.load_state_dict(renamed)
    assert calls == ["sparse"] and opt.step_count == 3


# ---------------------------------------------------------------------------------------------
# deepcopy and pickle
# ---------------------------------------------------------------------------------------------


SWITCHES = {"fixed": dict(switch=3), "autoswitch": dict(switch=None, total_steps=8)}  # AutoSwitch: T_max = 4


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("copy_at", [1, 5])  # in phase 1, in phase 2
@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_of_model_and_optimizer_continues_bit_identically(backend, copy_at, switch):
    model, opt = trained(copy_at, backend=backend, **SWITCHES[switch])
    copied_model, copied_opt = copy.deepcopy((model, opt))
    for step in range(copy_at, 7):
        train_step(model, opt, step, "cpu")
        train_step(copied_model, copied_opt, step, "cpu")
    assert opt.phase == "sparse" and opt.switch_step == (3 if switch == "fixed" else 4)
    assert_same_run(snapshot(copied_model, copied_opt), snapshot(model, opt))
    assert copied_opt.stats() == opt.stats()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickle_round_trip_continues_bit_identically(backend):
    model, opt = trained(2, backend=backend, switch=3)
    opt.register_step_post_hook(lambda optimizer, args, kwargs: None)  # not picklable; dropped as torch does
    loaded_model, loaded_opt = pickle.loads(pickle.dumps((model, opt)))
    assert not loaded_opt._optimizer_step_post_hooks
    for step in range(2, 6):
        train_step(model, opt, step, "cpu")
        train_step(loaded_model, loaded_opt, step, "cpu")
    assert loaded_opt.phase == "sparse" and loaded_opt.backend == backend
    assert_same_run(snapshot(loaded_model, loaded_opt), snapshot(model, opt))


def test_deepcopy_keeps_every_public_attribute():
    """As torch's generic optimizer tests check: the same public attributes, with equal values."""
    model, opt = trained(1, switch=sk.AutoSwitch(min_step=3, max_step=9, threshold=1e-6, rule="absolute"),
                         total_steps=20, precond_eps=1e-7, precond_dtype=torch.bfloat16)
    copied = copy.deepcopy(opt)
    public = {key for key in vars(opt) if not key.startswith("_")}
    assert public == {key for key in vars(copied) if not key.startswith("_")}
    assert {"recipe", "switch", "total_steps", "precond_eps", "precond_dtype", "backend"} <= public
    for key in public - {"state", "param_groups", "switch", "defaults"}:
        assert getattr(copied, key) == getattr(opt, key), key
    # torch's __setstate__ adds defaults["differentiable"] = False to every unpickled optimizer
    assert {k: v for k, v in copied.defaults.items() if k != "differentiable"} == opt.defaults
    assert repr(copied.switch) == repr(opt.switch) and copied.switch is not opt.switch
    assert copied._requested_backend == opt._requested_backend


# ---------------------------------------------------------------------------------------------
# from_adamw
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adamw_state():
    """AdamW.state_dict() after 3 steps over tiny_gpt's parameters."""
    model = tiny_gpt(seed=3)
    adamw = torch.optim.AdamW(model.parameters(), lr=2e-3, foreach=False)
    for step in range(3):
        train_step(model, adamw, step, "cpu")
    return copy.deepcopy(adamw.state_dict())


def set_adamw(pid, key, value):
    def mutate(sd):
        sd["state"][pid][key] = value(sd["state"][pid][key]) if callable(value) else value
        return sd
    return mutate


def every_step(value):
    def mutate(sd):
        for state in sd["state"].values():
            state["step"] = torch.tensor(value)
        return sd
    return mutate


def other_model_state(sd):
    """The AdamW state of a model with as many parameters of other shapes (d_model 48)."""
    from step_kernels.models import TinyGPT

    other = TinyGPT(vocab=64, ctx=16, d_model=48, n_layer=1, n_head=2)
    adamw = torch.optim.AdamW(other.parameters())
    train_step(other, adamw, 0, "cpu")
    return adamw.state_dict()


def drop_adamw(pid, key):
    def mutate(sd):
        del sd["state"][pid][key]
        return sd
    return mutate


LAST = 15  # ln_f.bias, the last of tiny_gpt's 16 parameters
BAD_ADAMW = [
    ("not_a_dict", lambda sd: [sd], r"adamw_state_dict must be AdamW\.state_dict\(\)"),
    ("no_param_groups", lambda sd: {"state": sd["state"]}, r"adamw_state_dict must be AdamW\.state_dict\(\)"),
    ("fewer_params", lambda sd: dict(sd, param_groups=[dict(sd["param_groups"][0],
                                                             params=sd["param_groups"][0]["params"][:-1])]),
     r"adamw_state_dict covers 15 params, the model has 16"),
    ("params_of_another_model", other_model_state, r"pos: AdamW exp_avg has shape \(16, 48\), param has \(16, 32\)"),
    ("last_wrong_shape", set_adamw(LAST, "exp_avg_sq", lambda t: t[:3]),
     r"ln_f\.bias: AdamW exp_avg_sq has shape \(3,\), param has \(32,\)"),
    ("different_step_counts", set_adamw(LAST, "step", torch.tensor(4.0)),
     r"different step counts per parameter: pos has 3, ln_f\.bias has 4"),
    ("no_exp_avg_sq", drop_adamw(LAST, "exp_avg_sq"), r"ln_f\.bias: AdamW state has no 'exp_avg_sq'"),
    ("no_step", drop_adamw(LAST, "step"), r"ln_f\.bias: AdamW state has no 'step'"),
    ("float64_moment", set_adamw(LAST, "exp_avg", lambda t: t.double()),
     r"ln_f\.bias: AdamW exp_avg must be a tensor of dtype .* got torch\.float64"),
    ("moment_not_a_tensor", set_adamw(LAST, "exp_avg", lambda t: t.tolist()),
     r"ln_f\.bias: AdamW exp_avg must be a tensor of dtype .* got list"),
    ("step_negative", every_step(-1.0), r"pos: AdamW step must be a whole number >= 0"),
    ("step_fractional", every_step(2.5), r"pos: AdamW step must be a whole number >= 0"),
    ("step_nan", every_step(float("nan")), r"pos: AdamW step must be a whole number >= 0"),
    ("amsgrad", lambda sd: dict(sd, param_groups=[dict(sd["param_groups"][0], amsgrad=True)]),
     r"param_groups\[0\] has amsgrad=True, which STEP cannot continue"),
]


@pytest.mark.parametrize("case", BAD_ADAMW, ids=[case[0] for case in BAD_ADAMW])
def test_from_adamw_bad_state_raises_and_leaves_the_model(case, adamw_state):
    """recipe="srste" masks the model when the optimizer is built: nothing may be built."""
    _, mutate, match = case
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        sk.STEP.from_adamw(model, mutate(copy.deepcopy(adamw_state)), recipe="srste", backend="reference")
    assert_same(snapshot(model), before)


def test_from_adamw_good_state_builds_and_masks(adamw_state):
    """The control of the test above: the unbroken state builds (and masks the model)."""
    model = tiny_gpt()
    before = snapshot(model)
    opt = sk.STEP.from_adamw(model, copy.deepcopy(adamw_state), recipe="srste", backend="reference")
    assert opt.step_count == 3
    with pytest.raises(AssertionError):
        assert_same(snapshot(model), before)
    for p, pid in zip(model.parameters(), adamw_state["param_groups"][0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg"], adamw_state["state"][pid]["exp_avg"])
