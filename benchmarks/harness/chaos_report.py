"""chaos.py's figures: each kill's recovery, the load's failures matched against the moments
processes were down, per kind of kill, the goals and the Markdown report.

A failed request is one `demo load` itself counts as failed (an answer it does not expect, or
no answer). Requests at ingestion are matched with outage windows: a victim is *down* from its
SIGKILL until its replacement serves, plus `GRACE` (callers' sidecars learn that it is back
from their next connection attempt). A failed idempotent request is *excused* when, at some
moment of its life, every instance of a Service on its path was down — no mesh can answer
then. Services on the path are those `ingestion.py` calls while answering (`PATH`): a status,
update or cancel goes to ingestion's app and then, through the route `delivery`, to
delivery-v1 or delivery-v2; a create is answered by ingestion alone (the scheduler gets it
later, off the request's path).
"""

from __future__ import annotations

import statistics
from collections import Counter

from harness.demo_load import IDEMPOTENT

GRACE = 1.0
BACK_GOAL = 5.0
KINDS = ("app", "sidecar", "control")
# What each operation at ingestion calls before it answers (meshproxy/demo/ingestion.py).
PATH = {"status": ("ingestion", "delivery-v1", "delivery-v2"),
        "update": ("ingestion", "delivery-v1", "delivery-v2"),
        "cancel": ("ingestion", "delivery-v1", "delivery-v2"),
        "create": ("ingestion",)}


def windows(kills: list[dict], end: float) -> list[tuple[float, float, dict]]:
    """(down from, down until, kill) for every kill; a victim that never came back is down
    until `end`."""
    out = []
    for kill in kills:
        back = kill.get("serving_at")
        out.append((kill["at"], (back if back is not None else end) + GRACE, kill))
    return out


def classify(records: list[tuple[float, str, str, float]], kills: list[dict], instances: dict[str, int],
             chaos_from: float, chaos_to: float, expected) -> dict:
    """Sort the failed requests started between `chaos_from` and `chaos_to`: excused (every
    instance of a Service on the path down), during a kill's window (another instance up, or
    the control plane down), or outside every window (with the kill before them)."""
    spans = windows(kills, chaos_to)
    result = {"requests": 0, "idempotent": 0, "failed": Counter(), "excused": Counter(),
              "in_window": Counter(), "outside": Counter(), "by_kill": {}, "failed_times": []}
    for end, op, answer, ms in records:
        start = end - ms / 1000
        if not chaos_from <= start <= chaos_to:
            continue
        result["requests"] += 1
        idempotent = op in IDEMPOTENT
        result["idempotent"] += idempotent
        if expected(op, answer):
            continue
        key = f"{op} {answer}"
        result["failed"][key] += 1
        overlapping = [k for lo, hi, k in spans if start <= hi and end >= lo]
        sole_down = [k for k in overlapping if k["kind"] != "control" and k["service"] in PATH.get(op, ())
                     and _all_down(k["service"], start, end, spans, instances)]
        if sole_down:
            result["excused"][key] += 1
            for k in sole_down:
                k.setdefault("excused", Counter())[key] += 1
        elif overlapping:
            result["in_window"][key] += 1
            for k in overlapping:
                k.setdefault("failed_during", Counter())[key] += 1
        else:
            before = [k for k in kills if k["at"] <= start]
            last = before[-1]["victim"] if before else "none"
            result["outside"][f"{key} (after {last})"] += 1
        result["failed_times"].append((round(start - chaos_from, 2), key, idempotent, bool(sole_down)))
    return result


def _all_down(service: str, start: float, end: float, spans, instances: dict[str, int]) -> bool:
    """True when, during [start, end], every instance of `service` was down at once."""
    down = {k["instance"] for lo, hi, k in spans
            if k["service"] == service and k["kind"] != "control" and start <= hi and end >= lo}
    return len(down) >= instances.get(service, 1)


def per_kind(kills: list[dict]) -> list[dict]:
    """One row per kind of kill: how many, back within the goal, times, failures during."""
    rows = []
    for kind in KINDS:
        mine = [k for k in kills if k["kind"] == kind]
        if not mine:
            continue
        back = [k["serving_at"] - k["at"] for k in mine if k.get("serving_at") is not None]
        respawn = [k["respawn_at"] - k["at"] for k in mine if k.get("respawn_at") is not None]
        failed = Counter()
        excused = Counter()
        for k in mine:
            failed.update(k.get("failed_during", {}))
            excused.update(k.get("excused", {}))
        rows.append({
            "kind": kind, "kills": len(mine), "victims": len({k["victim"] for k in mine}),
            "back_in_goal": sum(1 for b in back if b <= BACK_GOAL), "never_back": len(mine) - len(back),
            "respawn_median": statistics.median(respawn) if respawn else None,
            "back_median": statistics.median(back) if back else None,
            "back_max": max(back) if back else None,
            "failed_idempotent": sum(n for key, n in failed.items() if key.split()[0] in IDEMPOTENT),
            "failed_create": sum(n for key, n in failed.items() if key.split()[0] not in IDEMPOTENT),
            "excused": sum(excused.values()),
        })
    return rows


def _fmt(value, spec: str = ".2f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _counts(counter) -> str:
    return ", ".join(f"{k}: {n}" for k, n in Counter(counter).most_common()) or "none"


def markdown(raw: dict) -> str:
    """The report."""
    s, kills, c = raw["settings"], raw["kills"], raw["classified"]
    kinds = per_kind(kills)
    lines = [f"# Chaos under `meshproxy up` ({raw['meta']['started']})", ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in raw["meta"]["machine"].items()]
    lines += [f"| busy before start | {raw['meta']['busy_before']} |",
              f"| command | `{raw['meta']['command']}` |", ""]
    idem = Counter({k: n for k, n in c["in_window"].items() if k.split()[0] in IDEMPOTENT})
    for k, n in c["outside"].items():
        if k.split()[0] in IDEMPOTENT:
            idem[" ".join(k.split()[:2])] += n
    idem_failed = sum(idem.values())
    back_all = [k["serving_at"] - k["at"] for k in kills if k.get("serving_at") is not None]
    late = [k for k in kills if k.get("serving_at") is None or k["serving_at"] - k["at"] > BACK_GOAL]
    v = raw["versions"]
    lines += [f"{len(kills)} SIGKILLs in {raw['chaos_seconds']:.0f} s (one every {s['interval_min']:g}–"
              f"{s['interval_max']:g} s, seed {s['seed']}, a process only once it has run "
              f"{s['min_uptime']:g} s), during `demo load --rate {s['rate']:g} --concurrency "
              f"{s['concurrency']}`: {c['requests']:,} requests started during the chaos, "
              f"{c['idempotent']:,} of them idempotent (status GET, update PUT, cancel DELETE).", ""]
    if raw.get("cpu"):
        lines += [f"CPU during the run: the mesh {raw['cpu']['mesh_pct']:.0f} % of a core, other programs "
                  f"about {raw['cpu']['other_pct']:.0f} % (load average {raw['cpu']['loadavg']})." , ""]
    lines += ["| goal | measured | met |", "| --- | --- | --- |",
              f"| no idempotent request fails while another instance of its Service is up | "
              f"{idem_failed} failed" + (f" ({_counts(idem)})" if idem else "")
              + f"; {sum(c['excused'].values())} more failed while the only instance of a Service on "
              f"their path was down | {'**yes**' if idem_failed == 0 else '**no**'} |",
              f"| every killed process back (new pid) and serving within {BACK_GOAL:g} s | "
              f"{len(kills) - len(late)} of {len(kills)}; median {_fmt(statistics.median(back_all) if back_all else None)} s, "
              f"max {_fmt(max(back_all) if back_all else None)} s | {'**yes**' if not late else '**no**'} |",
              f"| after the run every sidecar holds the control plane's version | "
              f"{v['agreeing']} of {v['sidecars']} on `{v['control']}`"
              + (f" after {v['seconds']:.1f} s" if v.get("seconds") is not None else "")
              + (f"; differ: {', '.join(v['differ'])}" if v["differ"] else "")
              + f" | {'**yes**' if not v['differ'] and v['agreeing'] == v['sidecars'] else '**no**'} |", ""]
    lines += ["## Per kind of kill", "",
              "| kind | kills (processes) | back ≤ 5 s | never back | new pid after, median s | serving after, median / max s | "
              "failed idempotent, another instance up | failed creates | failed, only instance down (excused) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in kinds:
        lines.append(f"| {r['kind']} | {r['kills']} ({r['victims']}) | {r['back_in_goal']} | {r['never_back']} | "
                     f"{_fmt(r['respawn_median'])} | {_fmt(r['back_median'])} / {_fmt(r['back_max'])} | "
                     f"{r['failed_idempotent']} | {r['failed_create']} | {r['excused']} |")
    lines += ["", "*new pid after*: from the SIGKILL to the moment `up`'s replacement process exists "
              "(`up` waits 1 s before a restart of a process that ran 30 s or more); *serving after*: "
              "until it answers (sidecar and control plane `/ready`, an HTTP app `/healthz`, the gRPC "
              "app accepts connections). A failure is counted against a kill when the request was "
              f"in flight between the SIGKILL and {GRACE:g} s after the replacement served.", ""]
    lines += ["Failed requests by operation and answer:", "",
              f"- while another instance of every Service on the path was up (or the control plane was down): "
              f"{_counts(c['in_window'])}",
              f"- while the only instance of a Service on the path was down (excused): {_counts(c['excused'])}",
              f"- outside every kill's window (with the kill before them): {_counts(c['outside'])}", ""]
    lines += _control_lines(kills)
    lines += ["## Every kill", "",
              "| at s | victim | kind | up's delay s | new pid after s | serving after s | failed during (excused) |",
              "| ---: | --- | --- | ---: | ---: | ---: | --- |"]
    for k in kills:
        failed = _counts(k.get("failed_during", {})) if k.get("failed_during") else "—"
        excused = f" ({_counts(k['excused'])})" if k.get("excused") else ""
        lines.append(f"| {k['at'] - raw['chaos_from']:.1f} | {k['victim']} | {k['kind']} | {_fmt(k.get('up_delay'), 'g')} | "
                     f"{_fmt(k['respawn_at'] - k['at'] if k.get('respawn_at') else None)} | "
                     f"{_fmt(k['serving_at'] - k['at'] if k.get('serving_at') else None)} | {failed}{excused} |")
    lines.append("")
    from harness.soak_report import exceptions_lines

    lines += exceptions_lines(raw.get("app_exceptions"))
    if raw.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in raw["notes"]] + [""]
    return "\n".join(lines)


def _control_lines(kills: list[dict]) -> list[str]:
    control = [k for k in kills if k["kind"] == "control" and k.get("rewatched_at") is not None]
    if not control:
        return []
    times = [k["rewatched_at"] - k["at"] for k in control]
    return [f"After a control plane kill, every sidecar was watching the new one after "
            f"{statistics.median(times):.1f} s (median; max {max(times):.1f} s).", ""]
