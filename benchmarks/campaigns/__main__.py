"""python -m benchmarks.campaigns CAMPAIGN ...: the command line of every campaign (see __init__)."""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
from pathlib import Path

import benchmarks.campaigns as campaigns
from benchmarks.campaigns import common
from benchmarks.campaigns.broker_faults import ObjectStore, broker_crash_campaign, failover_campaign, stall_campaign
from benchmarks.campaigns.common import record
from benchmarks.campaigns.input_faults import clock_campaign, flood_campaign, fuzz_campaign
from benchmarks.campaigns.load import slow_campaign, soak_campaign
from benchmarks.campaigns.worker_faults import crash_campaign, rebalance_campaign, zombie_campaign
from streamer.kafka.broker import EmbeddedBroker


def main() -> None:
    ap = argparse.ArgumentParser(description=campaigns.__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="campaign", required=True)
    c = sub.add_parser("crash")
    c.add_argument("--beds", type=int, default=100)
    c.add_argument("--kills", type=int, default=20)
    c.add_argument("--seconds", type=float, default=240.0)
    c.add_argument("--speed", type=float, default=1.0)
    st = sub.add_parser("stall")
    st.add_argument("--stalls", default="5,30,120")
    st.add_argument("--beds", type=int, default=50)
    sl = sub.add_parser("slow")
    sl.add_argument("--beds", type=int, default=50)
    sl.add_argument("--seconds", type=float, default=120.0)
    sl.add_argument("--delay", type=float, default=2.0, help="added seconds per inference batch")
    sl.add_argument("--slow-for", type=float, default=45.0)
    so = sub.add_parser("soak")
    so.add_argument("--beds", type=int, default=200)
    so.add_argument("--seconds", type=float, default=600.0)
    so.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    so.add_argument("--pin", action="store_true", help="worker on its own CPU, broker and replayer on the rest")
    so.add_argument("--fetch", default=None, help="MIN_BYTES,MAX_WAIT_MS for the worker's fetches")
    so.add_argument("--storage", choices=["memory", "s3"], default="memory", help="s3: durable object storage")
    bc = sub.add_parser("broker-crash")
    bc.add_argument("--beds", type=int, default=50)
    bc.add_argument("--kills", type=int, default=5)
    bc.add_argument("--seconds", type=float, default=180.0)
    bc.add_argument("--speed", type=float, default=1.0)
    z = sub.add_parser("zombie", help="owner SIGSTOPped past its session timeout, a successor takes over, it resumes")
    z.add_argument("--beds", type=int, default=50)
    z.add_argument("--takeovers", type=int, default=3)
    z.add_argument("--seconds", type=float, default=180.0)
    z.add_argument("--speed", type=float, default=2.0)
    fo = sub.add_parser("failover", help="3 Apache Kafka brokers, RF 3: SIGKILL partition leaders")
    fo.add_argument("--beds", type=int, default=50)
    fo.add_argument("--kills", type=int, default=5)
    fo.add_argument("--seconds", type=float, default=240.0)
    fo.add_argument("--speed", type=float, default=1.0)
    rb = sub.add_parser("rebalance", help="a second worker joins and leaves the group, again and again")
    rb.add_argument("--beds", type=int, default=50)
    rb.add_argument("--moves", type=int, default=4)
    rb.add_argument("--seconds", type=float, default=180.0)
    rb.add_argument("--speed", type=float, default=2.0)
    ck = sub.add_parser("clock")
    ck.add_argument("--beds", type=int, default=50)
    ck.add_argument("--kills", type=int, default=3)
    f = sub.add_parser("fuzz")
    f.add_argument("--messages", type=int, default=10_000)
    f.add_argument("--beds", type=int, default=10)
    fl = sub.add_parser("flood")
    fl.add_argument("--ids", type=int, default=100_000, help="distinct patient ids, one record each")
    fl.add_argument("--beds", type=int, default=50, help="real beds streaming in real time beside the flood")
    fl.add_argument("--seconds", type=float, default=150.0)
    fl.add_argument("--max-patients", type=int, default=None, help="windows.max_patients (default: the setting's)")
    for p in (c, st, sl, so, f, ck, bc, z, fo, rb, fl):
        p.add_argument("--checkpoint", default=None)
        p.add_argument("--clock", default=None, help="the workers' wall clock moved by this libfaketime offset "
                       "(e.g. +2h, -30m; Debian's faketime package)")
        p.add_argument("--broker", choices=["apache", "embedded"], default="apache",
                       help="Apache Kafka (default; fetched by tools/kafka_cluster.py) or the embedded demo broker")
    args = ap.parse_args()
    common.WORKER_CLOCK = args.clock  # every worker process of the campaign
    skew = f", worker clock {args.clock}" if args.clock else ""
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    durable = args.campaign == "broker-crash" or getattr(args, "storage", "memory") == "s3"
    with contextlib.ExitStack() as stack:
        if durable:
            workdir = Path(tempfile.mkdtemp(prefix="durable-"))
            broker = stack.enter_context(stack.enter_context(ObjectStore(workdir)).broker(workdir / "broker.log"))
        elif args.broker == "embedded":
            broker = stack.enter_context(EmbeddedBroker())
        else:
            from tools.kafka_cluster import KafkaCluster

            folder = Path(tempfile.mkdtemp(prefix="apache-kafka-"))
            broker = stack.enter_context(KafkaCluster(folder, brokers=3 if args.campaign == "failover" else 1))
        on = ("Apache Kafka 4.4.0" if not durable and args.broker == "apache" else "embedded broker") + skew
        if args.campaign == "zombie":
            r = zombie_campaign(broker.bootstrap, args.beds, args.seconds, args.speed, args.checkpoint,
                                takeovers=args.takeovers)
            record(f"zombie campaign ({on}): {args.beds} beds at {args.speed:g}x, owner SIGSTOPped past its session "
                   f"timeout, successor takes over, owner resumes; x{args.takeovers}",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicate window_ids "
                   f"{r['duplicate_ids']} (read_committed); zombie exit codes {r['zombie_exit_codes']}; state "
                   f"regressions {r['state_regressions']}, seq regressions {r['seq_regressions']}")
        elif args.campaign == "rebalance":
            r = rebalance_campaign(broker.bootstrap, args.beds, args.moves, args.seconds, args.speed, args.checkpoint)
            record(f"rebalance campaign ({on}): {args.beds} beds at {args.speed:g}x, a second worker joins and "
                   f"leaves x{args.moves}",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicate window_ids "
                   f"{r['duplicate_ids']} (read_committed); state regressions {r['state_regressions']}, seq "
                   f"regressions {r['seq_regressions']}; exit codes {r['exit_codes']}")
        elif args.campaign == "failover":
            r = failover_campaign(broker, args.beds, args.kills, args.seconds, args.speed, args.checkpoint)
            record(f"broker failover ({on}, 3 brokers, RF 3, min.insync 2): {args.beds} beds at {args.speed:g}x, "
                   f"SIGKILL the leader of an input / flags partition x{args.kills}, restarted after 5 s",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicate window_ids "
                   f"{r['duplicate_ids']}; flag pause per kill {r['flag_pause_s']} s; worker exit {r['exit_code']}; seq "
                   f"regressions {r['seq_regressions']}")
        elif args.campaign == "broker-crash":
            r = broker_crash_campaign(broker, args.beds, args.kills, args.seconds, args.speed, args.checkpoint)
            record(f"broker crash campaign: {args.beds} beds at {args.speed:g}x real time, broker SIGKILL x{args.kills} "
                   f"(outages {r['outages_s']} s), S3 storage",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicates "
                   f"{r['duplicates']}; worker alive {r['worker_alive']}, exit {r['exit_code']}")
        elif args.campaign == "crash":
            r = crash_campaign(broker.bootstrap, args.beds, args.kills, args.seconds, args.speed, args.checkpoint)
            record(f"crash campaign ({on}): {args.beds} beds at {args.speed:g}x real time, SIGKILL x{args.kills}",
                   f"windows expected {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, duplicates "
                   f"{r['duplicates']}, duplicate window_ids {r['duplicate_ids']} (read_committed); last episode "
                   f"message vs restored state: {r['episode_mismatches']} mismatches over {r['episode_patients']} "
                   f"patients ({r['episodes_on_topic']} with episodes); seq regressions {r['seq_regressions']}")
        elif args.campaign == "stall":
            for stall in [float(v) for v in args.stalls.split(",")]:
                r = stall_campaign(broker, stall, args.beds, args.checkpoint)
                record(f"broker stall {stall:g}s (SIGSTOP), {args.beds} beds real time ({on})",
                       f"lost {r['lost']} of {r['expected']}, worker alive {r['worker_alive']}, exit {r['exit_code']}, "
                       f"recovery {r['recovery_s']}s, peak RSS {r['peak_rss_mb']} MB, duplicates {r['duplicates']}, "
                       f"duplicate window_ids {r['duplicate_ids']}, seq regressions {r['seq_regressions']}")
        elif args.campaign == "clock":
            r = clock_campaign(broker.bootstrap, args.beds, args.kills, args.checkpoint)
            record(f"clock campaign: {args.beds} beds (+2 h steps, -1 h steps, +30 min outliers, healthy), "
                   f"SIGKILL x{args.kills}",
                   f"lost {r['lost']} (old timeline {r['old_lost']} of {r['old_timeline_windows']}, new timeline "
                   f"{r['new_lost']} of {r['new_timeline_windows']}, healthy {r['healthy_lost']} of "
                   f"{r['healthy_windows']}); episodes left open past stale_after_s {r['episodes_left_open']}; "
                   f"exit {r['exit_code']}")
        elif args.campaign == "slow":
            r = slow_campaign(broker.bootstrap, args.beds, args.seconds, args.delay, args.slow_for, args.checkpoint)
            record(f"slow inference: +{args.delay:g}s per batch of <= 4 ({4 / args.delay:g} windows/s < {args.beds / 10:g} "
                   f"arriving) for {args.slow_for:g}s, {args.beds} beds real time",
                   f"fetch paused {r['paused_s']}s, peak pending windows {r['peak_pending']} (limit 64), peak buffers "
                   f"{r['peak_buffer_mb']} MB, caught up {r['catch_up_s']}s after recovery, lost {r['lost']} of "
                   f"{r['expected']}, exit {r['exit_code']}")
        elif args.campaign == "soak":
            r = soak_campaign(broker, args.beds, args.seconds, args.checkpoint, interval_s=args.interval, pin=args.pin,
                              fetch=tuple(map(int, args.fetch.split(","))) if args.fetch else None)
            record(f"soak: {args.beds} beds real time for {args.seconds:g}s (after 60 s warm-up)"
                   + (", S3 storage" if durable else "")
                   + (", worker pinned to its own CPU" if args.pin else "")
                   + (f", fetch min bytes,max wait ms {args.fetch}" if args.fetch else ""),
                   f"worker RSS {r['rss_mb_after_warmup']} -> {r['rss_mb_end']} MB ({r['rss_growth_pct']}%), broker RSS "
                   f"{r['broker_rss_mb'][0]} -> {r['broker_rss_mb'][1]} MB, patients buffered {r['patients_buffered'][0]} "
                   f"-> max {r['patients_buffered'][1]}, p99 per {args.interval:g} s interval {r['interval_p99_s'][0]}-"
                   f"{r['interval_p99_s'][1]} s, max pending {r['max_pending']}, exit {r['exit_code']}; "
                   f"cores used {r['cores_used']}")
        elif args.campaign == "flood":
            r = flood_campaign(broker.bootstrap, args.ids, args.beds, args.seconds, args.checkpoint,
                               max_patients=args.max_patients)
            record(f"patient-id flood ({on}): {r['ids']} new ids, one record each from one producer "
                   f"({r['flood_send_s']} s), beside {args.beds} real beds in real time, "
                   f"windows.max_patients {args.max_patients or 'default'}",
                   f"real beds: windows {r['expected']}, flagged {r['flagged']}, lost {r['lost']}, flag lateness "
                   f"p50 {r['lateness_p50_s']} s, p99 {r['lateness_p99_s']} s, max {r['lateness_max_s']} s (lease 35 s); "
                   f"flags of flood ids {r['flood_flags']}; dead letters {r['dead_letters']}; states after "
                   f"{r['states_after']}, patients held after {r['patients_after']}; worker RSS {r['rss_before_mb']} "
                   f"MB before, peak {r['rss_peak_mb']} MB; crashes {r['crashes']}")
        else:
            r = fuzz_campaign(broker.bootstrap, args.messages, args.beds, args.checkpoint)
            record(f"bad-input campaign: {r['hostile']} hostile records among {args.beds} healthy beds",
                   f"crashes {r['crashes']}, dead-lettered {r['dead_lettered']}/{r['hostile']}, "
                   f"healthy windows lost {r['lost']} of {r['expected']}; microvolts-as-millivolts windows "
                   f"reported implausible {r['uv_as_mv_reported_implausible']}/{r['uv_as_mv_windows']}, scored "
                   f"{r['uv_as_mv_scored']}; 500.0/500.001 Hz windows scored {r['noisy_rate_scored']}/"
                   f"{r['noisy_rate_windows']}; reasons {r['reasons']}")
        print(r)


if __name__ == "__main__":
    main()
