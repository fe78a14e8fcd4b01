"""The server's trust in valid uploads: per-site quotas, balanced shares, screening.

Validation (:mod:`~fedbip_flower.federation.payload`) makes sure an upload is *usable*. This
module bounds what a usable upload can make the server do and screens it for what an honest
site never sends, using only what the server holds: the upload, the other uploads and the
frozen LDM's text encoder. No real image is needed. Three stages, all in
:func:`screen_uploads`, run before synthesis (so they bound the synthesis work too):

1. **Quota** (``server.site-quota``, default ``data.shots``): a site brings at most that many
   latents per class to synthesis. Unless ``server.defence = off``, exact duplicate latents
   (an upload repeated) count once.
   What exceeds the quota is left unused, with a note naming the site. The run asked each site
   for ``data.shots`` images per class, so an honest upload is never cut.
2. **Screening** (``server.defence``): findings per site and, where they concern one class
   concept, per class. Checks (thresholds below, measured on honest uploads of the bundled
   world: docs/robustness.md):

   - *class-concept mismatch*: each class concept V[c] starts, at every site, from the token
     embedding of its class word (``client.init = word``) and moves from there. An honest V[c]
     stays nearer its own word than any other class's word (ratio of the distances at most
     0.82 measured); a V[c] that is nearer another class's word draws that class under the
     label c (permuted or exchanged concepts).
   - *concept drift*: V[c] farther from its word than ``MAX_DRIFT`` times the word's norm
     (honest: at most 0.94), e.g. concepts replaced by noise.
   - *concept norm*: any vector of S or V longer than ``MAX_NORM`` times the longest vector
     the words start from (scaled concepts).
   - *concepts not learned*: every V[c] equal to its plain word (the zero-shot prompt uploaded
     instead of learned concepts) although the run trains concepts (``client.steps`` > 0).
   - *latent statistics*: noised latents z(T) have unit variance whatever T (the VAE's latents
     are scaled to unit variance); more than ``MAX_ODD_LATENTS`` of a site's latents with a
     standard deviation outside ``LATENT_STD`` or a mean beyond ``LATENT_MEAN`` flag it.
   - *copies*: latents identical to another site's. The copied rows are kept once, at the
     site with fewer other findings (then the first in client order).

   ``off``: no screening. ``report``: findings are logged and written, nothing changes.
   ``down-weight``: a flagged class (or a flagged site's every class) keeps
   ``server.down-weight`` of its latents. ``exclude``: a flagged class is dropped; a site
   with a site-wide finding, or with half or more of its classes flagged, is dropped whole.
   ``replace`` (the default, chosen on validation seed 100): a flagged class concept is
   replaced by the median of the unflagged sites' concepts for that class (its word if there
   are none), a site-wide finding replaces every class concept so and S by the plain domain
   word; the site's latents are kept, synthesized under concepts the server can vouch for
   (a latent-statistics finding excludes the site: latents cannot be repaired).
3. **Balance** (``server.max-site-share``): no site holds more than that share of the
   latents that go to synthesis (hence of the synthetic set); a larger site is subsampled
   class by class. With a classifier step budget the classifier's work is fixed; with an
   epoch budget it is bounded by the sites' quotas.

Every limit and finding is logged as one line naming the site and kept in
:class:`Screening` (``results.json`` writes it per site). Clean uploads pass unchanged, so a
run without attackers gives the same model with and without this module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch

from fedbip_flower.config import FedBiPConfig
from fedbip_flower.federation.payload import safe_text
from fedbip_flower.method.upload import ClientPayload

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)

POLICIES = ("off", "report", "down-weight", "exclude", "replace")
CONCEPT_CHECKS = ("class-concept-mismatch", "concept-drift", "concept-norm", "concepts-not-learned")
MAX_DRIFT = 3.0  # |V[c] - word(c)| / |word(c)|; honest <= 0.94 on the bundled world
MAX_NORM = 8.0  # |any S or V vector| / longest initial vector; honest <= ~1.5
UNLEARNED = 1e-3  # |V[c] - word(c)| / |word(c)| below this for every class: not learned
LATENT_STD = (0.5, 2.0)  # per-latent standard deviation of an honest z(T); honest 0.92-1.10
LATENT_MEAN = 0.5  # |per-latent mean|; honest < 0.1
MAX_ODD_LATENTS = 0.1  # share of a site's latents outside those bounds that flags it


@dataclass
class Finding:
    """One thing an honest upload does not do. ``classes`` empty: the whole upload."""

    check: str
    evidence: str
    classes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"check": self.check, "classes": list(self.classes), "evidence": self.evidence}


@dataclass
class Screening:
    """What the server did with one site's upload before synthesis."""

    received: int  # latents (or labels, for a concept-only upload) received
    used: int = 0  # latents that go to synthesis
    notes: list[str] = field(default_factory=list)  # quota and balance
    findings: list[Finding] = field(default_factory=list)
    action: str = "kept"  # kept / down-weighted / classes excluded / excluded / flagged (report)
    excluded_classes: list[int] = field(default_factory=list)
    # what the checks measured (their margins on honest uploads are in docs/robustness.md)
    stats: dict[str, float] = field(default_factory=dict)
    synthetic: int = 0  # images synthesized from it
    synthesis_seconds: float = 0.0

    @property
    def flagged(self) -> bool:
        return bool(self.findings)

    def to_dict(self) -> dict:
        return {
            "received": self.received,
            "used": self.used,
            "notes": list(self.notes),
            "flagged": self.flagged,
            "findings": [f.to_dict() for f in self.findings],
            "action": self.action,
            "excluded_classes": list(self.excluded_classes),
            "stats": dict(self.stats),
            "synthetic": self.synthetic,
            "synthesis_seconds": self.synthesis_seconds,
        }


def subset(payload: ClientPayload, keep: torch.Tensor) -> ClientPayload:
    """``payload`` with only the latents (and labels) at indices ``keep``, in their order."""
    keep = keep.to(torch.int64)
    latents = payload.latents[keep] if payload.latents.shape[0] else payload.latents
    return replace(payload, latents=latents, labels=payload.labels[keep])


def _row_keys(payload: ClientPayload) -> list[bytes]:
    """A byte key per uploaded latent (its fp16 bytes and label): equal keys, equal latents."""
    n = len(payload.labels)
    if payload.latents.shape[0] == 0:
        return []
    flat = payload.latents.to(torch.float16).reshape(n, -1).contiguous().view(torch.int16).numpy()
    labels = payload.labels.numpy()
    return [flat[i].tobytes() + int(labels[i]).to_bytes(8, "little", signed=True) for i in range(n)]


def per_class_cap(labels: torch.Tensor, cap: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (ascending) of the first ``cap`` of each class among ``candidates`` (all)."""
    idx = torch.arange(len(labels)) if candidates is None else candidates
    if len(idx) == 0:
        return idx
    lab = labels[idx]
    order = torch.argsort(lab, stable=True)
    sorted_lab = lab[order]
    starts = torch.searchsorted(sorted_lab, sorted_lab, right=False)
    rank = torch.arange(len(order)) - starts
    return idx[order[rank < cap]].sort().values


def share_cap(counts: list[int], share: float) -> int:
    """The largest per-site count ``c`` such that, with every site cut to ``min(n, c)``, no
    site holds more than ``share`` of the total (``share`` below 1/N is taken as 1/N)."""
    if not counts:
        return 0
    share = max(share, 1.0 / len(counts))
    if share >= 1.0:
        return max(counts)
    lo, hi = 0, max(counts)
    while lo < hi:  # c <= share * sum(min(n, c)) holds for c up to some point, then fails
        mid = (lo + hi + 1) // 2
        if mid <= share * sum(min(n, mid) for n in counts) + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    return lo


def spread_cap(labels: torch.Tensor, cap: int) -> torch.Tensor:
    """``cap`` indices of ``labels`` spread over the classes as evenly as their counts allow
    (round-robin over classes, each class in upload order); ascending."""
    if cap >= len(labels):
        return torch.arange(len(labels))
    per = {int(c): torch.nonzero(labels == c).flatten().tolist() for c in labels.unique()}
    out: list[int] = []
    depth = 0
    while len(out) < cap:
        for c in sorted(per):
            if depth < len(per[c]) and len(out) < cap:
                out.append(per[c][depth])
        depth += 1
    return torch.tensor(sorted(out), dtype=torch.int64)


# ----------------------------------------------------------------------------- checks
def _word_anchors(components, payload: ClientPayload) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectors an honest site's concepts start from, for every class of the run:
    S0 (n_s, D) and V0 (C, n_v, D), laid out as the client lays out its prompts."""
    from fedbip_flower.method.concepts import initial_vectors
    from fedbip_flower.method.embeddings import build_layout

    layout = build_layout(
        components.tokenizer,
        payload.template,
        payload.s.shape[0],
        payload.v.shape[1],
        payload.domain,
        list(payload.class_names),
    )
    return initial_vectors(components.text_encoder, layout, payload.injection, "word", torch.Generator())


def concept_findings(components, payload: ClientPayload, cfg: FedBiPConfig, stats: dict | None = None) -> list[Finding]:
    """Findings on the concepts S and V of one upload (see the module docstring); ``stats``
    receives what was measured: the largest norm ratio, own/other word distance ratio and drift."""
    out: list[Finding] = []
    stats = {} if stats is None else stats
    if cfg.client.init != "word":
        return out  # concepts start at random: there is no word to compare with
    s0, v0 = _word_anchors(components, payload)
    ref = float(torch.cat([s0, v0.flatten(0, 1)]).norm(dim=-1).max().clamp_min(1e-8))
    longest = float(torch.cat([payload.s, payload.v.flatten(0, 1)]).norm(dim=-1).max())
    if longest > MAX_NORM * ref:
        out.append(
            Finding(
                "concept-norm",
                f"a concept vector of norm {longest:.3g} is {longest / ref:.1f}x the longest word vector "
                f"({ref:.3g}); the bound is {MAX_NORM:g}x",
            )
        )
    words = v0.flatten(1)  # (C, n_v * D)
    mine = payload.v.flatten(1)  # (K, n_v * D)
    dist = torch.cdist(mine, words)  # (K, C)
    classes = payload.v_classes.tolist()
    own = dist[torch.arange(len(classes)), payload.v_classes]
    # Classes whose words start from the same vector (names sharing their first tokens) cannot
    # be told apart: only a different word counts as another class's.
    same_word = torch.cdist(words, words) <= 1e-6 * words.norm(dim=1).max().clamp_min(1e-8)
    other = dist.masked_fill(same_word[payload.v_classes], float("inf"))
    nearest_other, which = other.min(1)
    word_norm = words.norm(dim=1).clamp_min(1e-8)[payload.v_classes]
    drift = own / word_norm
    stats["norm-ratio"] = longest / ref
    stats["word-distance-ratio"] = float((own / nearest_other).max())
    stats["drift"] = float(drift.max())
    stats["drift-min"] = float(drift.min())
    names = payload.class_names
    mismatch = [(i, c) for i, c in enumerate(classes) if own[i] >= nearest_other[i]]
    if mismatch:
        shown = ", ".join(
            f"'{safe_text(names[c], 40)}' is nearer '{safe_text(names[int(which[i])], 40)}' "
            f"({float(nearest_other[i]):.3g} vs {float(own[i]):.3g})"
            for i, c in mismatch[:4]
        )
        more = f" and {len(mismatch) - 4} more" if len(mismatch) > 4 else ""
        out.append(
            Finding(
                "class-concept-mismatch",
                f"{len(mismatch)} of {len(classes)} class concepts lie nearer another class's word than "
                f"their own: {shown}{more}",
                [c for _, c in mismatch],
            )
        )
    drifted = [(i, c) for i, c in enumerate(classes) if float(drift[i]) > MAX_DRIFT]
    if drifted:
        out.append(
            Finding(
                "concept-drift",
                f"{len(drifted)} class concept(s) moved more than {MAX_DRIFT:g}x their word's norm from it "
                f"(largest {float(drift.max()):.2f}x)",
                [c for _, c in drifted],
            )
        )
    if cfg.client.steps > 0 and float(drift.max()) < UNLEARNED:
        out.append(
            Finding(
                "concepts-not-learned",
                "every class concept equals its plain word (the zero-shot prompt), though the run trains concepts",
            )
        )
    return out


def latent_findings(payload: ClientPayload, stats: dict | None = None) -> list[Finding]:
    """Findings on the statistics of one upload's noised latents (``stats`` receives the range
    of the per-latent std and the largest |mean|)."""
    n = payload.latents.shape[0]
    if n == 0:
        return []
    stats = {} if stats is None else stats
    flat = payload.latents.float().reshape(n, -1)
    std, mean = flat.std(1), flat.mean(1)
    stats["latent-std-min"], stats["latent-std-max"] = float(std.min()), float(std.max())
    stats["latent-mean-abs-max"] = float(mean.abs().max())
    odd = (std < LATENT_STD[0]) | (std > LATENT_STD[1]) | (mean.abs() > LATENT_MEAN)
    share = float(odd.float().mean())
    if share <= MAX_ODD_LATENTS:
        return []
    return [
        Finding(
            "latent-statistics",
            f"{int(odd.sum())} of {n} latents have a std outside [{LATENT_STD[0]:g}, {LATENT_STD[1]:g}] or a "
            f"mean beyond +-{LATENT_MEAN:g} (median std {float(std.median()):.3g}); noised latents have unit variance",
        )
    ]


# ----------------------------------------------------------------------------- the stages
@dataclass
class Screened:
    """What :func:`screen_uploads` returns: the payloads to synthesize and every site's record."""

    uploads: dict  # key -> payload to synthesize (absent: nothing of the site is used)
    screening: dict  # key -> Screening


def _quota(payload: ClientPayload, per_class: int, screen: Screening, keys: list[bytes]) -> torch.Tensor:
    """Indices of ``payload`` within the quota: repeats dropped (given their ``keys``), then
    ``per_class`` per class."""
    n = len(payload.labels)
    if keys:
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        unique = torch.tensor(sorted(first.values()), dtype=torch.int64)
        if len(unique) < n:
            screen.notes.append(
                f"{n - len(unique)} of {n} latents are exact repeats of others in the upload: counted once"
            )
    else:
        unique = torch.arange(n)
    kept = per_class_cap(payload.labels, per_class, unique)
    if len(kept) < len(unique):
        screen.notes.append(
            f"{len(unique) - len(kept)} latents above the quota of {per_class} per class left unused "
            f"({len(kept)} of {n} kept)"
        )
    return kept


def screen_uploads(
    components,
    uploads: Mapping[K, ClientPayload],
    order: list[K],
    cfg: FedBiPConfig,
    describe: Callable[[K], str] = lambda k: f"site {k}",
) -> Screened:
    """Quota, screening and balance of validated ``uploads`` (keys in client ``order``)."""
    per_class = cfg.server.site_quota or cfg.data.shots
    policy = cfg.server.defence
    screens: dict[K, Screening] = {}
    kept: dict[K, torch.Tensor] = {}
    row_keys: dict[K, list[bytes]] = {}
    for key in order:
        p = uploads[key]
        screens[key] = Screening(received=len(p.labels))
        row_keys[key] = _row_keys(p)
        kept[key] = _quota(p, per_class, screens[key], row_keys[key] if policy != "off" else [])

    if policy != "off":
        for key in order:
            p = uploads[key]
            try:
                screens[key].findings += concept_findings(components, p, cfg, screens[key].stats)
            except Exception as err:  # noqa: BLE001 - a check that cannot run is reported, never fatal
                screens[key].findings.append(Finding("unscreenable", f"{type(err).__name__}: {safe_text(str(err))}"))
            screens[key].findings += latent_findings(subset(p, kept[key]), screens[key].stats)
        _copies(uploads, order, kept, row_keys, screens, describe, act=policy != "report")
        for key in order:
            _act(uploads[key], key, kept, screens[key], policy, cfg.server.down_weight)
        if policy == "replace":
            uploads = _replace_concepts(components, uploads, order, kept, screens)

    counts = [len(kept[k]) * cfg.server.multiplier for k in order]
    cap = share_cap(counts, cfg.server.max_site_share)
    for key, n in zip(order, counts, strict=True):
        if n > cap:
            before = len(kept[key])
            sel = spread_cap(uploads[key].labels[kept[key]], cap // cfg.server.multiplier)
            kept[key] = kept[key][sel]
            screens[key].notes.append(
                f"holds more than {cfg.server.max_site_share:g} of the synthetic set: {before} -> {len(kept[key])} "
                f"latents (subsampled class by class)"
            )

    out: dict[K, ClientPayload] = {}
    for key in order:
        s = screens[key]
        s.used = len(kept[key])
        for note in s.notes:
            log.warning("%s: %s", describe(key), note)
        for f in s.findings:
            where = f" (classes {f.classes})" if f.classes else ""
            log.warning("%s flagged, %s%s: %s", describe(key), f.check, where, f.evidence)
        if s.findings:
            log.warning(
                "%s: %s under defence '%s' (%d of %d latents used)", describe(key), s.action, policy, s.used, s.received
            )
        if s.used:
            out[key] = subset(uploads[key], kept[key]) if s.used != s.received else uploads[key]
    return Screened(out, screens)


def _copies(uploads, order, kept, row_keys, screens, describe, act: bool) -> None:
    """Latents identical to another site's: a finding on every site involved; with ``act``,
    the copied rows stay at one site only (fewest other findings, then client order)."""
    owner: dict[bytes, K] = {}
    shared: dict[tuple, int] = {}
    for key in order:
        for i in kept[key].tolist():
            k = row_keys[key][i] if row_keys[key] else None
            if k is None:
                continue
            first = owner.setdefault(k, key)
            if first != key:
                shared[(first, key)] = shared.get((first, key), 0) + 1
    for (a, b), n in shared.items():
        for x, y in ((a, b), (b, a)):
            screens[x].findings.append(
                Finding("copied-latents", f"{n} of its latents are identical to those of {describe(y)}")
            )
        if not act:
            continue
        others = {k: sum(f.check != "copied-latents" for f in screens[k].findings) for k in (a, b)}
        loser = b if others[a] <= others[b] else a
        winner = a if loser == b else b
        theirs = {row_keys[winner][i] for i in kept[winner].tolist()}
        keep = [i for i in kept[loser].tolist() if row_keys[loser][i] not in theirs]
        kept[loser] = torch.tensor(keep, dtype=torch.int64)
        screens[loser].notes.append(f"{n} latents copied from {describe(winner)} left unused (kept there)")


def _targets(payload: ClientPayload, findings: list[Finding]) -> tuple[bool, set[int]]:
    """(whole site?, the classes to act on) for ``findings`` on ``payload``."""
    classes = {int(c) for c in payload.v_classes.tolist()}
    flagged = {c for f in findings for c in f.classes}
    whole = any(not f.classes for f in findings) or len(flagged) * 2 >= len(classes)
    return whole, (classes if whole else flagged)


def _act(payload: ClientPayload, key, kept: dict, screen: Screening, policy: str, down_weight: float) -> None:
    """Apply ``policy`` to one site's findings (copies were handled already; ``replace`` of
    concepts is done by :func:`_replace_concepts`, here only what it cannot repair)."""
    findings = [f for f in screen.findings if f.check != "copied-latents"]
    if not findings:
        if screen.findings:
            screen.action = "flagged" if policy == "report" else "kept (copied latents used once)"
        return
    if policy == "report":
        screen.action = "flagged (report only)"
        return
    if policy == "replace":
        if any(f.check not in CONCEPT_CHECKS for f in findings):  # latents cannot be repaired
            kept[key] = kept[key][:0]
            screen.excluded_classes = sorted(int(c) for c in payload.v_classes.tolist())
            screen.action = "excluded"
        return
    whole, targets = _targets(payload, findings)
    labels = payload.labels[kept[key]]
    hit = torch.tensor([int(c) in targets for c in labels.tolist()], dtype=torch.bool)
    if policy == "exclude":
        kept[key] = kept[key][~hit]
        screen.excluded_classes = sorted(targets)
        screen.action = "excluded" if whole else f"classes {sorted(targets)} excluded"
        return
    # down-weight: keep ceil(down_weight * n) of each flagged class, in upload order
    keep = torch.ones(len(labels), dtype=torch.bool)
    for c in targets:
        idx = torch.nonzero(labels == c).flatten()
        keep[idx[math.ceil(down_weight * len(idx)) :]] = False
    kept[key] = kept[key][keep]
    screen.action = "down-weighted" if whole else f"classes {sorted(targets)} down-weighted"


def _replace_concepts(components, uploads: Mapping, order: list, kept: dict, screens: dict) -> dict:
    """``defence = replace``: a flagged class concept V[c] is replaced by the median of the
    unflagged sites' V[c] (the class's word where no site holds it unflagged); a site-wide
    finding replaces every V[c] so and S by the plain domain word. The site's latents are kept:
    they are synthesized under concepts the server can vouch for."""
    plans = {}
    for key in order:
        s = screens[key]
        findings = [f for f in s.findings if f.check in CONCEPT_CHECKS]
        if findings and s.action != "excluded":
            plans[key] = _targets(uploads[key], findings)
    if not plans:
        return uploads
    trusted: dict[tuple, list[torch.Tensor]] = {}  # (class, n_v, D) -> unflagged V[c] of other sites
    for key in order:
        p = uploads[key]
        whole, bad = plans.get(key, (False, set()))
        if whole or screens[key].action == "excluded":
            continue
        for i, c in enumerate(p.v_classes.tolist()):
            if c not in bad:
                trusted.setdefault((c, *p.v.shape[1:]), []).append(p.v[i])
    out = dict(uploads)
    for key, (whole, targets) in plans.items():
        p = uploads[key]
        s0, v0 = _word_anchors(components, p)
        v = p.v.clone()
        for i, c in enumerate(p.v_classes.tolist()):
            if c in targets:
                others = trusted.get((c, *p.v.shape[1:]))
                v[i] = torch.stack(others).median(0).values if others else v0[c]
        out[key] = replace(p, v=v, s=s0.to(p.s.dtype) if whole else p.s)
        screen = screens[key]
        screen.excluded_classes = []
        screen.action = (
            "concepts replaced (S by its word, V by the other sites')"
            if whole
            else f"class concepts {sorted(targets)} replaced by the other sites'"
        )
    return out
