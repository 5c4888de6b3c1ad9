"""Which transfer syntax the listener accepts per presentation context: the requestor's
first that we accept, or the site's preference; held to pynetdicom's own negotiation."""

from __future__ import annotations

import logging
import os
import sys

import pydicom.uid as uid
import pytest
import trio
from hypothesis import given, strategies as st
from pynetdicom import build_context
from pynetdicom.presentation import negotiate_as_acceptor

from nodes.dimse._pynetdicom import acceptor_contexts
from nodes.dimse.contexts import ACCEPTED_TRANSFER_SYNTAXES, PREFERENCE_PRESETS, syntax_order

sys.path.insert(0, os.path.dirname(__file__))

CT = uid.CTImageStorage
MR = uid.MRImageStorage
ELE, ILE, EBE = uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.ExplicitVRBigEndian
JLS, JPLL, RLE, J2K = uid.JPEGLSLossless, uid.JPEGLosslessSV1, uid.RLELossless, \
    uid.JPEG2000Lossless
ALL = frozenset(ACCEPTED_TRANSFER_SYNTAXES)


def _proposed(*contexts: tuple[str, list[str]]):
    out = []
    for i, (sop_class, syntaxes) in enumerate(contexts):
        cx = build_context(sop_class, syntaxes)
        cx.context_id = 2 * i + 1
        out.append(cx)
    return out


def _negotiated(proposed, supported, preference=()) -> dict[int, str | None]:
    """{context ID: accepted syntax or None}, as pynetdicom negotiates it with our list."""
    result, _roles = negotiate_as_acceptor(
        proposed, acceptor_contexts(proposed, supported, preference))
    return {cx.context_id: str(cx.transfer_syntax[0]) if cx.result == 0 else None
            for cx in result}


def test_dcmsend_fallbacks_keep_each_files_own_syntax():
    # dcmsend: one context per file syntax, the uncompressed ones as fall-backs in each.
    proposed = _proposed((CT, [JLS, ELE, EBE, ILE]), (CT, [JPLL, ELE, EBE, ILE]),
                         (CT, [RLE, ELE, EBE, ILE]), (CT, [ELE, EBE, ILE]))
    assert _negotiated(proposed, {CT: ALL}) == {1: JLS, 3: JPLL, 5: RLE, 7: ELE}


def test_pynetdicoms_own_order_would_have_decompressed():
    proposed = _proposed((CT, [JLS, ELE, ILE]))
    static = [build_context(CT, list(ACCEPTED_TRANSFER_SYNTAXES))]
    result, _ = negotiate_as_acceptor(proposed, static)
    assert result[0].transfer_syntax[0] == ELE  # what the listener did before


def test_explicit_little_endian_first_makes_the_modality_decompress():
    proposed = _proposed((CT, [JLS, ILE, ELE]), (MR, [RLE, ILE]), (MR, [J2K]))
    preference = PREFERENCE_PRESETS["explicit-little-endian-first"]
    assert _negotiated(proposed, {CT: ALL, MR: ALL}, preference) == {1: ELE, 3: ILE, 5: J2K}


def test_a_listed_preference_wins_in_its_order_then_as_proposed():
    proposed = _proposed((CT, [ELE, JLS, RLE]), (CT, [JPLL, ILE]), (MR, [ELE, RLE]))
    assert _negotiated(proposed, {CT: ALL, MR: ALL}, [RLE, JLS]) == {1: RLE, 3: JPLL, 5: RLE}


def test_unsupported_classes_and_syntaxes_are_refused_as_before():
    proposed = _proposed((CT, ["1.2.3.4.5"]), ("1.2.3.999", [ELE]), (MR, [ELE]))
    result, _ = negotiate_as_acceptor(proposed, acceptor_contexts(proposed, {CT: ALL, MR: ALL}))
    assert [(cx.context_id, cx.result) for cx in result] == [(1, 4), (3, 3), (5, 0)]


def test_contradicting_contexts_of_one_class_the_earlier_wins():
    assert syntax_order([[JLS, ELE], [ELE, JLS]], ALL) == [JLS, ELE]
    # Not a contradiction: an order exists that gives each its own first choice.
    assert syntax_order([[JLS, RLE], [ELE, JLS]], ALL) == [ELE, JLS, RLE]


_SYNTAXES = [ELE, ILE, EBE, JLS, JPLL, RLE, J2K, "1.2.3.4"]  # the last: one we never accept


@given(st.lists(st.lists(st.sampled_from(_SYNTAXES), min_size=1, max_size=5, unique=True),
                min_size=1, max_size=5),
       st.lists(st.sampled_from(_SYNTAXES[:7]), max_size=3, unique=True))
def test_every_context_gets_its_choice_unless_contexts_contradict(proposals, preference):
    order = syntax_order(proposals, ALL, preference)
    assert len(order) == len(set(order))
    assert set(order) == {ts for p in proposals for ts in p if ts in ALL}
    wanted = []
    for p in proposals:
        ours = [ts for ts in p if ts in ALL]
        listed = [ts for ts in preference if ts in ours]
        wanted.append(listed[0] if listed else (ours[0] if ours else None))
    got = [next((ts for ts in order if ts in p), None) for p in proposals]
    # Contradiction: a context's choice must come after another's choice that it also
    # proposes, while that one must come after it. Only then may a context lose.
    unpreferred = [(w, p) for w, p in zip(wanted, proposals)
                   if w is not None and not any(ts in p for ts in preference)]
    if not _has_cycle(unpreferred):
        assert got == wanted
    else:
        assert got[0] == wanted[0]  # the first context always gets its choice


def _has_cycle(choices) -> bool:
    edges = {w: set() for w, _p in choices}
    for w, p in choices:
        for ts in p:
            if ts in ALL and ts != w:
                edges.setdefault(w, set()).add(ts)
    seen, stack = set(), set()

    def visit(node) -> bool:
        if node in stack:
            return True
        if node in seen:
            return False
        seen.add(node)
        stack.add(node)
        found = any(visit(n) for n in edges.get(node, ()))
        stack.discard(node)
        return found

    return any(visit(n) for n in list(edges))


def test_contexts_built_without_setters_equal_the_public_way(monkeypatch):
    from nodes.dimse import _pynetdicom

    proposed = _proposed((CT, [JLS, ELE, ILE]), (MR, [RLE, ILE]), (CT, [JPLL, ELE]))
    direct = acceptor_contexts(proposed, {CT: ALL, MR: ALL})
    monkeypatch.setattr(_pynetdicom, "_direct", [False])
    public = acceptor_contexts(proposed, {CT: ALL, MR: ALL})
    assert [(cx.abstract_syntax, cx.transfer_syntax) for cx in direct] == \
        [(cx.abstract_syntax, cx.transfer_syntax) for cx in public] == \
        [(CT, [JLS, ILE, JPLL, ELE]), (MR, [RLE, ILE])]


@pytest.mark.peer("dcmtk")
async def test_listener_negotiates_in_its_own_order_loudly_when_the_choice_fails(
        tmp_path, monkeypatch, caplog):
    from nodes.dimse import DicomListener, _pynetdicom
    from support.synth import ct, write

    from dimse_support import Committer, listen_config, running, storescu  # noqa: E402

    def broken(*_args, **_kw):
        raise RuntimeError("pynetdicom changed")

    monkeypatch.setattr(_pynetdicom, "acceptor_contexts", broken)
    path = write(ct(), tmp_path / "ct.dcm")
    listener, sink = DicomListener(listen_config()), Committer(name="sink")
    with caplog.at_level(logging.INFO):
        async with running(listener >> sink, listener=listener):
            # -xb: Explicit VR Big Endian proposed first, then the little endian ones;
            # pynetdicom's own order (Explicit VR LE first) decides; the object arrives.
            result = await trio.to_thread.run_sync(
                lambda: storescu(listener.address[1], [path], extra=["+C", "-xb"]))
    assert result.returncode == 0, result.stderr
    assert [a.envelope.transfer_syntax_uid for a, _ in sink.arrivals] == [ELE]
    fallback = [r for r in caplog.records if r.getMessage() == "dimse.negotiation_fallback"]
    assert fallback and fallback[0].levelno == logging.ERROR
    assert fallback[0].fields["error_class"] == "RuntimeError"
