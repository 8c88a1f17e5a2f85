"""Counts of a sweep's DAG nodes: before it runs, what is left to compute; after, what was computed or taken
from the store and what loading models cost, for the parent run's tags and metrics and the console."""
from __future__ import annotations

from .dag import SweepDag


def to_compute(sub: SweepDag, store_spec: str) -> str:
    """`, computing N calibrations, N fits, N dense evaluations` for the nodes whose artifact is not in the store."""
    if not sub.cells:
        return ""
    try:
        from .store import open_store

        store = open_store(store_spec)
        have = {kind: set(store.keys(kind)) for kind in ("stats", "plans", "dense")}
    except Exception:    # an unreachable store is reported when the nodes run; here only the count is lost
        have = {"stats": set(), "plans": set(), "dense": set()}
    parts = []
    for kind, nodes, what in (("stats", sub.stats, "calibration"), ("plans", sub.plans, "fit"),
                              ("dense", sub.dense, "dense evaluation")):
        stored = sum(k in have[kind] for k in nodes)
        parts.append(f"{len(nodes) - stored} {what}(s)" + (f" (+{stored} from the store)" if stored else ""))
    return ", computing " + ", ".join(parts)


def node_counts(nodes: dict) -> dict:
    """{calibrations,fits,dense_evals}_{computed,cached}, OOM retries, actors, Ray nodes used: for tags and metrics."""
    out = {}
    for kind, name in (("stats", "calibrations"), ("plan", "fits"), ("dense", "dense_evals")):
        rs = [r for (k, _), r in nodes["results"].items() if k == kind]
        out[f"{name}_computed"] = sum(r["source"] == "computed" for r in rs)
        out[f"{name}_cached"] = sum(r["source"] == "cache" for r in rs)
    out["oom_retries"] = sum(r.get("oom_retries", 0) for r in nodes["results"].values())
    out["actors"], out["actor_deaths"] = nodes["actors"], nodes["actor_deaths"]
    out["ray_nodes"] = len({r["worker"]["node"] for r in nodes["results"].values() if r.get("worker", {}).get("node")})
    return out


def model_counts(nodes: dict) -> dict:
    """Model loads, cache hits, seconds spent loading, and the seconds the hits saved (hits x mean load time)."""
    ms = [r["model"] for r in nodes["results"].values() if "model" in r]
    loads, hits, load_s = sum(m["loads"] for m in ms), sum(m["hits"] for m in ms), sum(m["load_s"] for m in ms)
    return {"loads": loads, "cache_hits": hits, "load_s": load_s,
            "load_s_saved": hits * load_s / loads if loads else 0.0}


def nodes_line(n: dict, m: dict) -> str:
    """The console's line after the cells, from node_counts and model_counts."""
    return (f"nodes: {n['calibrations_computed']} calibration(s) computed + {n['calibrations_cached']} from the store, "
            f"{n['fits_computed']} + {n['fits_cached']} fit(s), {n['dense_evals_computed']} + "
            f"{n['dense_evals_cached']} dense evaluation(s); model: {m['loads']} load(s) ({m['load_s']:.1f} s), "
            f"{m['cache_hits']} reuse(s) saving ~{m['load_s_saved']:.1f} s"
            + (f"; {n['actors']} model worker(s)" if n["actors"] else "")
            + (f", {n['actor_deaths']} died and were replaced" if n["actor_deaths"] else ""))
