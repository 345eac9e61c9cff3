"""The command-line options of `streamer gateway hl7|sdc` and `streamer alerts hl7` (docs/gateways.md).
Standard library only: `streamer --help` must answer without importing the gateways' libraries."""

from __future__ import annotations

import argparse


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT); port 0..65535."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _tls(parser: argparse.ArgumentParser, side: str) -> None:
    parser.add_argument("--tls-cert", help=f"certificate chain (PEM) this {side} presents")
    parser.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    parser.add_argument("--tls-ca", help="CA bundle (PEM) the peer's certificate must chain to (server side: "
                        "peers must present one: mutual TLS)")


def hl7_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", type=host_port, required=True, metavar="HOST:PORT",
                        help="address the MLLP receiver listens on (PORT 0: a free one, printed at start)")
    parser.add_argument("--key-by", choices=["patient", "bed"], default="patient",
                        help="patient: PID-3 (a message without it is refused); bed: PV1-3 when PID-3 is empty")
    parser.add_argument("--max-connections", type=int, default=256, help="connections served at once")
    parser.add_argument("--max-message-bytes", type=int, default=1 << 20,
                        help="largest MLLP message accepted (a connection holds at most about twice this)")
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="seconds a silent connection is kept")
    parser.add_argument("--max-beds", type=int, default=10000,
                        help="beds whose segment is remembered (least recently seen forgotten: a new segment)")
    parser.add_argument("--resume-records", type=non_negative, default=2000, metavar="N",
                        help="at start, each bed's segment is resumed from the newest N records of each input "
                        "partition (needs READ on the input: `streamer acls --role gateway`); 0: every bed starts "
                        "a new segment. N should cover a few messages of every bed of a partition")
    parser.add_argument("--naive-times", choices=["refuse", "utc"], default="refuse",
                        help="a time without UTC offset (nor one in MSH-7): refused (AE), or read as UTC")
    parser.add_argument("--encoding", choices=["json", "binary"], default="json",
                        help="input record format: json keeps every float64 mV value exactly; binary is float32")
    parser.add_argument("--allow-plain-mllp", action="store_true",
                        help="listen beyond loopback without TLS (a protected network only; warned at start)")
    _tls(parser, "receiver")


def sdc_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", action="append", default=[], metavar="URL",
                        help="a provider's device endpoint (https://HOST:PORT/...) or EPR urn; repeatable")
    parser.add_argument("--devices-file", help="file with one device URL or EPR per line")
    parser.add_argument("--key-by", choices=["patient", "location"], default="patient",
                        help="patient: the PatientContext's identification; location: the LocationContext's")
    parser.add_argument("--adapter", default="127.0.0.1", help="network address discovery and notifications use")
    parser.add_argument("--max-queued-reports", type=int, default=300,
                        help="waveform reports a device may have waiting for Kafka (300: 30 s at 10/s); more "
                        "are dropped, counted and logged, and a new segment starts after the gap")
    parser.add_argument("--silence-s", type=float, default=5.0,
                        help="seconds without a report from an active waveform before the device is reconnected")
    _tls(parser, "consumer")


def hl7_alerts_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", type=host_port, required=True, metavar="HOST:PORT",
                        help="the alarm manager's MLLP receiver (IHE PCD ACM, PCD-04)")
    parser.add_argument("--renew-s", type=float, default=None,
                        help="seconds between `continue` messages of an active alert (default: a third of the lease)")
    parser.add_argument("--ack-timeout", type=float, default=10.0, help="seconds to wait for an ACK before resending")
    _tls(parser, "sender")
