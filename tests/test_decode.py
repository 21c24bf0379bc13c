"""`lorakit.graphed_generate`: its steps run eagerly here (graphs=False) against transformers'
`generate`; the CUDA-graph replays against those eager steps are in test_gpu.py."""

import pytest
import torch
from test_route import with_adapters
from tiny_models import LLAMA_TARGETS, input_ids, tiny_llama_causal

import lorakit


def hf_greedy(model, ids, mask=None, **kw):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                          do_sample=False, **kw)


def test_greedy_equals_transformers_generate():
    model = tiny_llama_causal()
    ids = input_ids(batch=3, seq=6)
    want = hf_greedy(model, ids, max_new_tokens=7, pad_token_id=0)
    got = lorakit.graphed_generate(model, ids, max_new_tokens=7, pad_token_id=0, graphs=False)
    assert torch.equal(got, want)


def test_left_padded_prompts_equal_each_prompt_alone():
    model = tiny_llama_causal()
    ids = input_ids(batch=3, seq=7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is a 4-token prompt, row 2 a 6-token one
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    got = lorakit.graphed_generate(model, ids, mask, max_new_tokens=6, pad_token_id=0, graphs=False)
    assert got.shape == (3, 13)
    for i in range(3):
        start = int((mask[i] == 0).sum())
        alone = lorakit.graphed_generate(model, ids[i:i + 1, start:], max_new_tokens=6, pad_token_id=0,
                                         graphs=False)
        assert torch.equal(got[i:i + 1, 7:], alone[:, 7 - start:]), i
    assert torch.equal(got, hf_greedy(model, ids, mask, max_new_tokens=6, pad_token_id=0))


def test_rows_after_eos_are_padding_and_it_stops_when_all_are_done():
    model = tiny_llama_causal()
    ids = input_ids(batch=2, seq=5)
    free = lorakit.graphed_generate(model, ids, max_new_tokens=8, pad_token_id=0, eos_token_id=[], graphs=False)
    eos = int(free[0, 5 + 2])  # row 0's third new token
    got = lorakit.graphed_generate(model, ids, max_new_tokens=8, pad_token_id=0, eos_token_id=eos, graphs=False)
    row0 = got[0, 5:]
    first = int((row0 == eos).nonzero()[0])
    assert (row0[first + 1:] == 0).all() and first <= 2
    want = hf_greedy(model, ids, max_new_tokens=8, pad_token_id=0, eos_token_id=eos)
    n = want.shape[1]
    assert torch.equal(got[:, :n], want) and (got[:, n:] == 0).all()
    # every row ends at once: generation stops at the next check (within STOP_CHECK_EVERY steps)
    both = torch.stack([ids[0], ids[0]])
    short = lorakit.graphed_generate(model, both, max_new_tokens=40, pad_token_id=0, eos_token_id=eos,
                                     graphs=False)
    assert short.shape[1] <= 5 + first + 1 + lorakit.decode.STOP_CHECK_EVERY


def test_mixed_batch_equals_each_row_alone():
    model = with_adapters(tiny_llama_causal(), LLAMA_TARGETS)
    ids = input_ids(batch=3, seq=6)
    rows = ["b", None, "a"]
    with lorakit.route(model, rows):
        mixed = lorakit.graphed_generate(model, ids, max_new_tokens=5, pad_token_id=0, graphs=False)
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disable_adapters(model):
                want = hf_greedy(model, ids[i:i + 1], max_new_tokens=5, pad_token_id=0)
        else:
            lorakit.set_adapter(model, name)
            want = hf_greedy(model, ids[i:i + 1], max_new_tokens=5, pad_token_id=0)
        assert torch.equal(mixed[i:i + 1], want), (i, name)


def test_sampling_is_seeded_and_stays_in_vocab():
    model = tiny_llama_causal()
    ids = input_ids(batch=2, seq=4)
    torch.manual_seed(3)
    a = lorakit.graphed_generate(model, ids, max_new_tokens=6, temperature=1.5, graphs=False)
    torch.manual_seed(3)
    b = lorakit.graphed_generate(model, ids, max_new_tokens=6, temperature=1.5, graphs=False)
    assert torch.equal(a, b) and a.shape == (2, 10)
    assert int(a.max()) < model.config.vocab_size and int(a.min()) >= 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0, graphs=False), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=3, temperature=-1.0, graphs=False), "temperature must be >= 0"),
    (dict(max_new_tokens=3), "CUDA graphs need a CUDA device"),
])
def test_bad_arguments_say_what_was_expected(kwargs, match):
    model = tiny_llama_causal()
    with pytest.raises(ValueError, match=match):
        lorakit.graphed_generate(model, input_ids(batch=1, seq=3), **kwargs)
    with pytest.raises(ValueError, match="must be \\(batch, length\\)"):
        lorakit.graphed_generate(model, torch.ones(4, dtype=torch.long), max_new_tokens=2, graphs=False)


def test_timings_report_each_phase():
    model = tiny_llama_causal()
    t: dict = {}
    out = lorakit.graphed_generate(model, input_ids(batch=2, seq=4), max_new_tokens=5, eos_token_id=[],
                                   graphs=False, timings=t)
    assert out.shape == (2, 9) and t["steps"] == 4 and set(t) == {"prefill_s", "steps_s", "steps"}
    assert t["prefill_s"] > 0 and t["steps_s"] > 0


def test_static_cache_arguments_for_either_transformers_signature():
    """transformers 5's StaticCache takes the config and length; 4.x also the batch size (under
    max_batch_size or batch_size), device and dtype: each gets what it names."""
    from lorakit.decode import _static_cache

    class Five:
        def __init__(self, config, max_cache_len, **kwargs):
            self.kw = dict(max_cache_len=max_cache_len, **kwargs)

    class Four:
        def __init__(self, config, batch_size=None, max_cache_len=None, device=None, dtype=torch.float32):
            self.kw = dict(batch_size=batch_size, max_cache_len=max_cache_len, device=device, dtype=dtype)

    model = tiny_llama_causal().to(torch.float64)
    assert _static_cache(Five, model, 3, 20, torch.device("cpu")).kw == {"max_cache_len": 20}
    assert _static_cache(Four, model, 3, 20, torch.device("cpu")).kw == dict(
        batch_size=3, max_cache_len=20, device=torch.device("cpu"), dtype=torch.float64)
