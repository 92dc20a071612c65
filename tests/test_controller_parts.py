"""The controller's parts on their own: condenser, translator, shaper, think step, prompt vector, watch pool."""
import pytest
import torch
import torch.nn.functional as F

from twig_batch.controller import ControllerConfig, LatentController, build_controller_net
from twig_batch.controller.think import ThinkContext, prompt_vector, think_ids, think_latents

D = 64


def _net(**kw):
    return build_controller_net(D, ControllerConfig(init_std=0.2, **kw), dtype=torch.float64)


def test_condenser_is_order_free_and_per_row():
    net = _net()
    states = torch.randn(3, 32, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    memory, m_vec = net.condenser(states)
    assert memory.shape == (3, 8, D) and m_vec.shape == (3, D)
    assert torch.allclose(m_vec, memory.mean(dim=1))
    shuffled, _ = net.condenser(states[:, torch.randperm(32, generator=torch.Generator().manual_seed(1))])
    assert torch.allclose(shuffled, memory, atol=1e-12)  # so a ring buffer can feed it unrotated
    alone, _ = net.condenser(states[1:2])
    assert torch.allclose(alone[0], memory[1], atol=1e-12)
    short, _ = net.condenser(states[:, :5])  # a band's first steps: fewer states than the window
    assert short.shape == (3, 8, D) and not torch.allclose(short, memory)


def test_translator_gate_bounds_the_control_vector_and_shaper_makes_k_tokens():
    net = _net(control_tokens=3)
    z, m, p = torch.randn(3, 2, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    raw = net.translator.net(torch.cat([z, m, p], dim=-1))
    c = net.translator(z, m, p, 0.5)
    gate = torch.sigmoid(net.translator.gate(raw))
    assert torch.allclose(c, raw * gate * 0.5)
    assert (c.norm(dim=-1) <= 0.5 * raw.norm(dim=-1)).all()
    assert not net.translator(z, m, p, 0.0).any()
    tokens = net.shaper(c)
    assert tokens.shape == (2, 3, D)
    assert torch.allclose(tokens[1], net.shaper(c[1:2])[0])


def test_think_latents_are_one_cache_free_pass_each_over_text_then_memory(tiny64):
    ids = think_ids(tiny64, "  a small cat on a large table  ", 4)
    assert ids == tiny64.encode("a small cat on a large table")[-4:]
    # As the design notes encode it: BOS first (the tokenizer's default), then the last N tokens.
    assert think_ids(tiny64, " a small cat\n", 64) == [tiny64.tokens.bos, *tiny64.encode("a small cat")]
    assert think_ids(tiny64, "a small cat", 3) == tiny64.encode("a small cat")[-3:]
    text = tiny64.embed_text(torch.tensor(ids))
    memory = torch.randn(3, 8, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    texts = [text, text[:1], text[:0]]  # ragged, down to an empty prompt, which still thinks
    z = think_latents(tiny64, texts, memory)
    for row, t in enumerate(texts):
        manual = tiny64.language_model(inputs_embeds=torch.cat([t, memory[row]])[None], use_cache=False)
        assert torch.allclose(z[row], manual.last_hidden_state[0].mean(dim=0), rtol=0, atol=1e-12)
    assert not torch.allclose(z[0], z[1])


def test_a_think_context_runs_the_texts_once_and_thinks_like_the_full_pass(tiny64):
    ids = tiny64.encode("a small cat on a large table")
    text = tiny64.embed_text(torch.tensor(ids))
    texts = [text, text[:1], text[:0], text[2:5]]
    context = ThinkContext(tiny64, texts, memory_tokens=8)
    for seed, rows in enumerate([[0, 1, 2, 3], [2], [3, 0]]):  # thinks of a band, on any subset, in any order
        memory = torch.randn(len(rows), 8, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        z = context.latents(torch.tensor(rows), memory)
        expected = think_latents(tiny64, [texts[r] for r in rows], memory)
        assert torch.allclose(z, expected, rtol=0, atol=1e-12)


def test_prompt_vector_is_the_mean_embedding_of_the_clean_prompt(tiny64):
    ids = tiny64.encode("a red cube")
    assert torch.equal(prompt_vector(tiny64, " a red cube\n"), tiny64.embed_text(torch.tensor(ids)).mean(dim=0))
    assert not prompt_vector(tiny64, "   ").any()


def test_the_window_holds_exactly_the_last_states(tiny64):
    """After more steps than the window holds, s_t is computed from the latest `window` states."""
    config = ControllerConfig(window=8, min_history=8, tau_drop=1e9, tau_entropy=1e9)
    controller = LatentController(tiny64, ["a red cube"], config)
    states = torch.randn(20, 1, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for step in range(20):
        controller.observe(step, states[step], torch.zeros(1, 512, dtype=torch.float64), torch.zeros(1, dtype=torch.long))
    _, m_vec = controller.net.condenser(states[12:20].transpose(0, 1))
    expected = F.cosine_similarity(m_vec, controller.p_vecs[0:1], dim=-1).item()
    assert abs(controller.trigger_log(0)[-1]["s_t"] - expected) < 1e-12


def test_watches_keep_their_state_and_logs_when_the_pool_grows_and_when_slots_are_reused(tiny64):
    """Many images' bands watched at once (the pool grows past its first 64 slots, and reuses the
    slots of bands that ended): each one's trigger log is what it is when watched alone."""
    config = ControllerConfig(min_history=1, window=4, var_window=4, force_every=3, min_gap=0)
    prompts = [f"a cat number {i}" for i in range(80)]
    width = tiny64.language_model.config.hidden_size

    def state(image, band, step):  # the hidden state and logits of one image's token
        g = torch.Generator().manual_seed(1000 * image + 100 * band + step)
        return torch.randn(1, width, generator=g, dtype=torch.float64), torch.randn(1, 32, generator=g,
                                                                                     dtype=torch.float64)

    def observe(watches, step):
        rows = [state(*watch.identity[:2], step) for watch in watches]
        type(watches[0]).observe_together(watches, [step] * len(watches), torch.cat([h for h, _ in rows]),
                                          torch.cat([u for _, u in rows]))

    crowded = LatentController(tiny64, prompts, config)
    watches = [crowded.watch(i, 0) for i in range(60)]
    for step in range(8):
        if step == 3:  # 20 bands end; 30 start, in their slots first, then in new ones
            for ended in watches[1:21]:
                ended.close()
            watches = watches[:1] + watches[21:] + [crowded.watch(i, 1) for i in range(50, 80)]
        observe(watches, step)
    assert watches[0].pool.capacity > 64

    exact = ("band", "attempt", "step", "fired", "forced", "injected")
    for image, band, steps in ((0, 0, range(8)), (50, 1, range(3, 8)), (79, 1, range(3, 8))):
        alone = LatentController(tiny64, prompts, config)
        watch = alone.watch(image, band)
        for step in steps:
            observe([watch], step)
        got = [r for r in crowded.trigger_log(image) if r["band"] == band]
        want = alone.trigger_log(image)
        assert [[r[k] for k in exact] for r in got] == [[r[k] for k in exact] for r in want]
        for key in ("s_t", "delta_s", "var_s", "u_t"):  # other rows beside it in the batch: rounding only
            assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-9, abs=1e-12, nan_ok=True)
        assert sum(r["injected"] for r in want) >= 1
