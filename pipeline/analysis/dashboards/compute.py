"""``compute_dashboards``: stream a corpus through the clean model, checkpoint, then write the store.

The steps (sequences, stream, checkpoint, quantile groups, contexts, logits, labels, store) are
described in docs/dashboards.md; :class:`DashboardRun` holds one computation's state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline._io import StoreLock, digest_json

from .checkpoint import read_checkpoint, write_checkpoint
from .config import FORMAT, FORMAT_VERSION, MAX_SEQ_LEN, POS_BITS, DashboardConfig
from .corpus import (
    TokenBatch,
    TokenSequence,
    batches,
    corpus_fingerprint,
    corpus_iterable,
    make_batch,
    sequences,
)
from .logits import DecoderLogits, decoder_logits
from .stats import LayerState, quantile_bins, quantile_examples, update_layer
from .store import is_store
from .writer import write_store

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from the last transcoder-input hook: nothing after it is needed."""


@torch.no_grad()
def mlp_inputs(model, tokens: Tensor) -> list[Tensor]:
    """Transcoder inputs of every layer on a batch, from one clean forward pass.

    tokens: (B, T) input ids (right padding is harmless: the model is causal)
    returns n_layers tensors (B, T, d_model), the tensors at the transcoders'
    ``feature_input_hook`` (what ``ReplacementModel.capture`` records per prompt). The forward
    pass stops right after the last layer's input (no final MLP, no unembedding).
    """
    store: dict[int, Tensor] = {}
    last = model.n_layers - 1

    def save(layer: int):
        def hook(tensor: Tensor, *, hook) -> None:
            store[layer] = tensor.detach()
            if layer == last:
                raise _StopForward

        return hook

    fwd = [(model.input_hooks[layer], save(layer)) for layer in range(model.n_layers)]
    try:
        with model.hooks(fwd):
            model.bridge(tokens)
    except _StopForward:
        pass
    missing = [layer for layer in range(model.n_layers) if layer not in store]
    if missing:
        raise RuntimeError(f"the forward pass did not reach the transcoder input of layers {missing}")
    return [store[layer] for layer in range(model.n_layers)]


def firing_entries(acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The entries of ``acts`` (n, F) that are > 0, row-major: rows, features (n_fire,) int64
    and activations (n_fire,) float32, on the activations' device."""
    nonzero = acts.bool()  # != 0 is cheaper than > 0 over the dense matrix; negatives drop below
    if nonzero.device.type == "cpu":  # numpy's nonzero is several times faster than torch's there
        flat = torch.from_numpy(np.flatnonzero(nonzero.numpy()))
    else:
        flat = nonzero.reshape(-1).nonzero().squeeze(1)
    vals = acts.reshape(-1).index_select(0, flat).float()
    positive = (vals > 0).nonzero().squeeze(1)
    flat, vals = flat.index_select(0, positive), vals.index_select(0, positive)
    n_features = acts.shape[1]
    return flat // n_features, flat % n_features, vals


def _fingerprint(model, cfg: DashboardConfig, corpus_fp: str | None, seq_len: int) -> str:
    """What a checkpoint and a store are valid for: format, config, model, transcoders, corpus."""
    return digest_json(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "config": cfg.result_dict(),
            "seq_len": seq_len,
            "model": model.digest(),
            "transcoders": model.transcoders.digest(),
            "corpus": corpus_fp,
            "dtype": str(model.dtype),
        }
    )


class _CorpusChanged(Exception):
    """The corpus prefix a checkpoint consumed reads differently now."""


class DashboardRun:
    """One dashboards computation: owns the checkpoint directory and the streaming state.

    ``meta`` holds the stream's position (batches, sequences, tokens, documents, running hash
    of the sequences read) and ``layers`` one :class:`LayerState` per layer; both are what a
    checkpoint saves.
    """

    def __init__(self, model, corpus, out: Path, cfg: DashboardConfig, progress: bool):
        self.model = model
        self.tc = model.transcoders
        self.cfg = cfg
        self.out = out
        self.progress = progress
        self.corpus_iter = corpus_iterable(corpus)
        self.seq_len = int(cfg.seq_len or min(int(model.n_ctx), 128))
        if self.seq_len > int(model.n_ctx):
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's context {model.n_ctx}")
        self.partial = out.parent / f".{out.name}.partial"
        self.state_path = self.partial / "state.bin"
        self.fingerprint = _fingerprint(model, cfg, corpus_fingerprint(corpus), self.seq_len)
        tok = model.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (tok.eos_token_id or 0))
        self.device = model.device
        self.inner_edges = torch.as_tensor(cfg.hist_edges()[1:-1], dtype=torch.float64, device=self.device)
        self.layers: list[LayerState] = []
        self.meta: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "n_batches": 0,
            "n_seqs": 0,
            "n_tokens": 0,
            "n_docs": 0,
            "token_hash": hashlib.sha256().hexdigest(),
            "stream_done": False,
        }

    # ------------------------------------------------------------------ checkpoint
    def load_checkpoint(self) -> bool:
        if not self.state_path.exists():
            return False
        try:
            meta, arrays = read_checkpoint(self.state_path)
        except (ValueError, KeyError, OSError) as exc:
            log.warning("dashboards: unreadable checkpoint %s (%s); starting over", self.state_path, exc)
            return False
        if meta.get("fingerprint") != self.fingerprint:
            log.warning("dashboards: checkpoint %s is for other inputs; starting over", self.partial)
            return False
        self.meta = meta
        self.layers = [
            LayerState(
                self.tc.d_transcoder,
                self.cfg,
                {n: arrays[f"{layer}/{n}"] for n in LayerState.NAMES},
                device=self.device,
            )
            for layer in range(self.model.n_layers)
        ]
        return True

    def save_checkpoint(self) -> None:
        arrays = {f"{layer}/{n}": a for layer, st in enumerate(self.layers) for n, a in st.arrays().items()}
        write_checkpoint(self.state_path, self.meta, arrays)

    def reset_partial(self) -> None:
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        self.layers = [
            LayerState(self.tc.d_transcoder, self.cfg, device=self.device) for _ in range(self.model.n_layers)
        ]

    # ------------------------------------------------------------------ step 2: stream
    def stream(self) -> None:
        """Fold every batch of the corpus into the layer states, checkpointing as it goes."""
        cfg = self.cfg
        skip = int(self.meta["n_seqs"])
        h = hashlib.sha256()
        seqs = sequences(self.model, self.corpus_iter, self.seq_len, cfg.max_tokens)
        last_doc = -1
        for _ in range(skip):  # resume: re-read the consumed prefix and check it is unchanged
            s = next(seqs, None)
            if s is None:
                break
            h.update(s.hash_bytes())
            last_doc = s.doc
        if h.hexdigest() != self.meta["token_hash"]:
            raise _CorpusChanged
        bar = tqdm(
            total=cfg.max_tokens,
            initial=int(self.meta["n_tokens"]),
            unit="tok",
            unit_scale=True,
            desc="dashboards: stream",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        t0, n0 = time.perf_counter(), int(self.meta["n_tokens"])
        try:
            since = 0
            for batch_seqs in batches(seqs, cfg.batch_tokens):
                batch = make_batch(batch_seqs, self.pad_id, self.device)
                self._process(batch)
                for s in batch_seqs:
                    h.update(s.hash_bytes())
                last_doc = batch_seqs[-1].doc
                self.meta.update(
                    n_batches=int(self.meta["n_batches"]) + 1,
                    n_seqs=int(self.meta["n_seqs"]) + len(batch_seqs),
                    n_tokens=int(self.meta["n_tokens"]) + batch.n_tokens,
                    n_docs=last_doc + 1,
                    token_hash=h.hexdigest(),
                )
                bar.update(batch.n_tokens)
                since += 1
                if since >= cfg.checkpoint_every:
                    self.save_checkpoint()
                    since = 0
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        done = int(self.meta["n_tokens"]) - n0
        if int(self.meta["n_tokens"]) == 0:
            raise ValueError(
                "the corpus gave no tokens: it is empty or every document is blank; give a corpus "
                "with at least one non-empty document"
            )
        log.info(
            "dashboards: streamed %d tokens in %.1fs (%.0f tok/s)",
            done,
            elapsed,
            done / elapsed if elapsed > 0 else float("nan"),
        )
        self.meta["stream_done"] = True
        self.save_checkpoint()

    def _process(self, batch: TokenBatch) -> None:
        """One forward pass; every layer's firing entries go to its state without leaving the device."""
        xs = mlp_inputs(self.model, batch.tokens)
        tids = torch.from_numpy(batch.tids).to(self.device)  # (n_valid,)
        for layer, x in enumerate(xs):
            rows, feats, vals = firing_entries(self.tc.activations(layer, x[batch.valid]))
            update_layer(self.layers[layer], layer, tids[rows], feats, vals, self.inner_edges, self.cfg.seed)

    # ------------------------------------------------------------------ step 6: logits
    def logits(self) -> list[DecoderLogits]:
        """Every layer's decoder logits, each layer checkpointed as it is done."""
        W_U = self.model.W_U
        out = []
        bar = tqdm(
            total=self.model.n_layers * self.tc.d_transcoder,
            unit="feat",
            unit_scale=True,
            desc="dashboards: logits",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            for layer in range(self.model.n_layers):
                path = self.partial / f"logits_{layer}.bin"
                if path.exists():
                    meta, arrays = read_checkpoint(path)
                    if meta.get("fingerprint") == self.fingerprint:
                        out.append(DecoderLogits(**arrays))
                        bar.update(self.tc.d_transcoder)
                        continue
                res = decoder_logits(self.tc, W_U, layer, self.cfg.n_logits, chunk=self.cfg.logits_chunk)
                write_checkpoint(path, {"fingerprint": self.fingerprint}, res.arrays())
                out.append(res)
                bar.update(self.tc.d_transcoder)
        finally:
            bar.close()
        return out

    # ------------------------------------------------------------------ step 4: quantile groups
    def examples(self) -> list[dict[str, Any]]:
        """Per layer, every example slot: top-k (F*K) then quantile (F*Q*M), flattened.

        Each dict: tid (token ids, -1 empty), value, feature, bounds (F, Q+1) and n_top (F*K).
        """
        cfg = self.cfg
        out = []
        for layer, st in enumerate(self.layers):
            arrays = st.arrays()
            bounds = quantile_bins(arrays["hist"], cfg.n_quantiles)
            q_id, q_val = quantile_examples(st, layer, bounds, cfg.n_quantiles, cfg.seed)
            F, K = st.F, st.K
            top_id, top_val = arrays["top_id"], arrays["top_val"]
            tid = np.concatenate([top_id.reshape(-1), q_id.reshape(-1)])
            val = np.concatenate([np.where(top_id >= 0, top_val, 0).reshape(-1).astype(np.float32), q_val.reshape(-1)])
            feature = np.concatenate(
                [np.repeat(np.arange(F), K), np.repeat(np.arange(F), q_id.shape[1] * q_id.shape[2])]
            )
            out.append({"tid": tid, "value": val, "feature": feature, "bounds": bounds, "n_top": F * K})
        return out

    # ------------------------------------------------------------------ step 5: contexts
    def contexts(self, examples: list[dict[str, Any]]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Windows of every example; examples[l]["tid"]: (E_l,) token ids (-1 empty).

        returns windows[l] (E_l, W) float32 and the stored sequences table.
        """
        cfg = self.cfg
        W = cfg.window
        offsets = np.arange(-cfg.context_before, cfg.context_after + 1)
        per_layer = []
        for ex in examples:
            tid = ex["tid"]
            slots = np.nonzero(tid >= 0)[0]
            seq = tid[slots] >> POS_BITS
            order = np.argsort(seq, kind="stable")
            per_layer.append((slots[order], seq[order], (tid[slots] & (MAX_SEQ_LEN - 1))[order]))
        ref = np.unique(np.concatenate([p[1] for p in per_layer] + [np.zeros(0, np.int64)]))
        windows = [np.zeros((ex["tid"].size, W), dtype=np.float32) for ex in examples]
        table: dict[str, list] = {"id": [], "doc": [], "start": [], "tokens": []}
        if ref.size == 0:
            return windows, _sequence_table(table)
        last_ref = int(ref[-1])

        def wanted() -> Iterator[TokenSequence]:
            h, n = hashlib.sha256(), 0
            for s in sequences(self.model, self.corpus_iter, self.seq_len, cfg.max_tokens):
                h.update(s.hash_bytes())
                n += 1
                if s.seq_id <= last_ref:
                    i = np.searchsorted(ref, s.seq_id)
                    if i < ref.size and ref[i] == s.seq_id:
                        yield s
            if n != int(self.meta["n_seqs"]) or h.hexdigest() != self.meta["token_hash"]:
                raise RuntimeError(
                    "the corpus changed between the two passes over it; give a corpus that reads the same every time"
                )

        bar = tqdm(
            total=int(ref.size), unit="seq", desc="dashboards: contexts", disable=not self.progress, dynamic_ncols=True
        )
        try:
            for batch_seqs in batches(wanted(), cfg.batch_tokens):
                for s in batch_seqs:
                    table["id"].append(s.seq_id)
                    table["doc"].append(s.doc)
                    table["start"].append(s.start)
                    table["tokens"].append(s.tokens.astype(np.int32))
                batch = make_batch(batch_seqs, self.pad_id, self.device)
                lo, hi = int(batch.seq_ids[0]), int(batch.seq_ids[-1])
                xs = mlp_inputs(self.model, batch.tokens)
                for layer, x in enumerate(xs):
                    slots, seq, pos = per_layer[layer]
                    a_lo, a_hi = np.searchsorted(seq, lo, "left"), np.searchsorted(seq, hi, "right")
                    if a_hi <= a_lo:
                        continue
                    acts = self.tc.activations(layer, x).float()  # (B, T, F)
                    acts[:, 0, :] = 0
                    s_slots, s_seq, s_pos = slots[a_lo:a_hi], seq[a_lo:a_hi], pos[a_lo:a_hi]
                    rows = np.searchsorted(batch.seq_ids, s_seq)
                    feats = examples[layer]["feature"][s_slots]
                    P = s_pos[:, None] + offsets[None, :]
                    ok = (P >= 0) & (P < batch.lengths[rows][:, None])
                    Pc = np.clip(P, 0, acts.shape[1] - 1)
                    got = acts[
                        torch.from_numpy(rows[:, None]).to(acts.device),
                        torch.from_numpy(Pc).to(acts.device),
                        torch.from_numpy(np.broadcast_to(feats[:, None], P.shape).copy()).to(acts.device),
                    ]
                    windows[layer][s_slots] = np.where(ok, got.cpu().numpy(), 0.0)
                bar.update(len(batch_seqs))
        finally:
            bar.close()
        return windows, _sequence_table(table)


def _sequence_table(t: dict[str, list]) -> dict[str, np.ndarray]:
    """The stored sequences: id, doc, start (S,), offsets (S+1,) into the concatenated tokens."""
    lengths = np.array([x.size for x in t["tokens"]], dtype=np.int64)
    return {
        "id": np.array(t["id"], dtype=np.int64),
        "doc": np.array(t["doc"], dtype=np.int64),
        "start": np.array(t["start"], dtype=np.int64),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "tokens": (np.concatenate(t["tokens"]) if t["tokens"] else np.zeros(0)).astype(np.int32),
    }


def compute_dashboards(
    model,
    corpus,
    out_path: str | os.PathLike,
    cfg: DashboardConfig | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> Path:
    """Compute every feature's dashboard from ``corpus`` and write one store at ``out_path``.

    model: a ``ReplacementModel``. corpus: a re-iterable of texts (a list, ``read_corpus(path)``,
    ``hf_dataset_corpus(...)``, ``organism_corpus(...)``) or a function returning a fresh
    iterator; it is read twice (stream, then contexts) and again to resume.
    An interrupted run leaves ``.<out>.partial/``; rerunning with the same inputs resumes there.
    ``out_path`` must not exist unless ``overwrite`` (then a finished dashboards store there is
    replaced; anything else is refused). Returns ``out_path``.
    """
    cfg = cfg or DashboardConfig()
    out = Path(out_path)
    with StoreLock(out):  # one run per output at a time (they would share the checkpoint)
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} exists; remove it or pass overwrite=True (--overwrite)")
            if not is_store(out):
                raise ValueError(f"{out} exists and is not a dashboards store; refusing to replace it")
        _compute(model, corpus, out, cfg, progress)
    return out


def _compute(model, corpus, out: Path, cfg: DashboardConfig, progress: bool) -> None:
    """Steps 1-8 of :func:`compute_dashboards`, under the output's lock."""
    # 1-3. stream the corpus into the layer states (resuming from a checkpoint; once more from
    # the start if the corpus changed since it)
    for attempt in range(2):
        run = DashboardRun(model, corpus, out, cfg, progress)
        resumed = run.load_checkpoint()
        if not resumed:
            run.reset_partial()
        else:
            log.info("dashboards: resuming after %d tokens (%d batches)", run.meta["n_tokens"], run.meta["n_batches"])
        try:
            if not run.meta["stream_done"]:
                run.stream()
            break
        except _CorpusChanged:
            if attempt:
                raise RuntimeError("the corpus changes between reads; give a deterministic corpus") from None
            log.warning("dashboards: the corpus changed since the checkpoint; starting over")
            shutil.rmtree(run.partial)
    # 4-8. logits, quantile groups, contexts, labels and the store
    logits = run.logits()
    examples = run.examples()
    windows, seqs = run.contexts([{"tid": e["tid"], "feature": e["feature"]} for e in examples])
    write_store(run, examples, windows, seqs, logits)
    shutil.rmtree(run.partial, ignore_errors=True)
