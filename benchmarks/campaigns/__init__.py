"""Reliability campaigns on loopback (bounded in time, stop by themselves); Apache Kafka by default
(`--broker embedded` for the demo broker; broker-crash and `--storage s3` use the embedded one).

    python -m benchmarks.campaigns crash --beds 100 --kills 10 --seconds 240 --speed 2
    python -m benchmarks.campaigns zombie --beds 50 --takeovers 3
    python -m benchmarks.campaigns failover --beds 50 --kills 5            # 3 brokers, RF 3
    python -m benchmarks.campaigns stall --stalls 5,30,120 --beds 50
    python -m benchmarks.campaigns fuzz --messages 10000 --beds 10
    python -m benchmarks.campaigns flood --ids 100000 --beds 50        # a patient-id flood beside real beds
    python -m benchmarks.campaigns slow --beds 50 --delay 2 --slow-for 45
    python -m benchmarks.campaigns soak --beds 200 --seconds 600
    python -m benchmarks.campaigns clock --beds 50 --kills 3
    python -m benchmarks.campaigns rebalance --beds 50 --moves 4
    python -m benchmarks.campaigns crash --clock +2h ...    # any worker campaign, its clock skewed (faketime)
    python -m benchmarks.campaigns broker-crash --beds 50 --kills 5      # durable (S3) storage
    python -m benchmarks.campaigns soak --beds 100 --seconds 600 --storage s3

Each prints its figures and appends them to benchmarks/RESULTS.md. tests/campaigns/test_campaigns.py runs short
versions of the same functions in CI. One module per kind of fault (worker_faults, broker_faults,
input_faults, load); common.py holds what they share.
"""
