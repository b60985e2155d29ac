"""Continuous batching (engine/batcher.py): a stream's frames do not depend on who it is batched with.

Reference: ``TalkingHead.frames`` (the fixed-batch FrameLoop) for the same inputs, sampler and seed. Alone,
the batcher must match it exactly; batched with streams that join and leave mid-way (other faces, seeds,
samplers and step counts), within 1 uint8 level (the UNet's batched kernels may round differently; on this
machine the difference measured 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dheads.engine.batcher import Batcher, Stream
from dheads.engine.config import SamplerConfig
from dheads.engine.pipeline import Inputs, TalkingHead

from _serve import FACE, short_speech

DDIM3 = SamplerConfig(name="ddim", steps=3)
DDPM4 = SamplerConfig(name="ddpm", steps=4)
WARM = SamplerConfig(name="dpmpp_2m", steps=4, warm_steps=2)


@pytest.fixture(scope="module")
def head():
    return TalkingHead.open(threads=1)


@pytest.fixture(scope="module")
def inputs(head, tmp_path_factory):
    return head.prepare(FACE, short_speech(tmp_path_factory.mktemp("b") / "s.wav", 0.3))


def reference(head, identity, emb, sampler, seed):
    inp = Inputs(identity=identity, samples=np.zeros(0, np.float32), audio_emb=emb)
    return np.stack(list(head.frames(inp, sampler=sampler, seed=seed)))


def stream(head, identity, emb, sampler, seed, **kw):
    return Stream(head.denoiser, identity, diffusion=head.info.diffusion, sampler=sampler, seed=seed,
                  audio_emb=emb, **kw)


def test_alone_equals_frame_loop(head, inputs):
    ref = reference(head, inputs.identity, inputs.audio_emb, DDIM3, 5)
    s, b = stream(head, inputs.identity, inputs.audio_emb, DDIM3, 5), Batcher(head.denoiser)
    got = []
    while not s.done:
        got += [f.rgb for f in b.step([s])]
    assert np.array_equal(np.stack(got), ref)
    assert b.unet_calls == 3 * inputs.n_frames


def test_join_and_leave_mid_way_changes_no_frame(head, inputs):
    emb = inputs.audio_emb
    other = inputs.identity.flip(-1)  # another face
    a = stream(head, inputs.identity, emb, DDIM3, 5)
    b = stream(head, other, emb[:3], DDPM4, 11)  # joins at frame 2, leaves after 3 frames
    c = stream(head, other, emb[:4], WARM, 3)  # joins at frame 3, warm starts: 4 calls then 2 per frame
    batcher, out = Batcher(head.denoiser), {id(a): [], id(b): [], id(c): []}
    while not a.done:
        live = [a] + [s for s, join in ((b, 2), (c, 3)) if a.frames_done >= join and not s.done]
        for f in batcher.step(live):
            out[id(f.stream)].append(f.rgb)
    assert [len(out[id(s)]) for s in (a, b, c)] == [inputs.n_frames, 3, 4]
    for s, ident, e, sampler, seed in ((a, inputs.identity, emb, DDIM3, 5), (b, other, emb[:3], DDPM4, 11),
                                       (c, other, emb[:4], WARM, 3)):
        ref = reference(head, ident, e, sampler, seed)
        diff = np.abs(np.stack(out[id(s)]).astype(int) - ref.astype(int)).max()
        assert diff <= 1, f"stream {sampler.name} differs from its lone run by {diff}"
    # frames 3.. of a shared one call per step with c (and b up to frame 4): fewer calls than streams x steps
    alone = 3 * inputs.n_frames + 4 * 3 + 4 + 2 * 3
    assert batcher.unet_calls < alone


def test_streaming_audio_waits_for_its_window(head, inputs):
    emb, w = inputs.audio_emb, head.denoiser.config.audio_window
    s = stream(head, inputs.identity, None, DDIM3, 5, final=False)
    assert not s.ready and s.n_frames is None
    s.feed(emb[: w + 2])  # rows 0..w+1 known: frames 0 and 1 have their whole window
    assert s.available == 2
    b, got = Batcher(head.denoiser), []
    while s.ready:
        got += [f.rgb for f in b.step([s])]
    assert len(got) == 2 and not s.done
    s.feed(emb, final=True)
    while not s.done:
        got += [f.rgb for f in b.step([s])]
    assert np.array_equal(np.stack(got), reference(head, inputs.identity, emb, DDIM3, 5))
    with pytest.raises(ValueError, match="audio shrank"):
        s.feed(emb[:1])


def test_paused_stream_sits_out(head, inputs):
    a = stream(head, inputs.identity, inputs.audio_emb, DDIM3, 5)
    b = stream(head, inputs.identity, inputs.audio_emb, DDIM3, 6)
    b.paused = True
    frames = Batcher(head.denoiser).step([a, b])
    assert [f.stream for f in frames] == [a] and b.frames_done == 0
    assert isinstance(frames[0].rgb, np.ndarray) and frames[0].rgb.shape == (64, 64, 3)
    assert torch.equal(b.video.ring.buffer[:, 0], b.video.ring.buffer[:, -1])  # b's state untouched
