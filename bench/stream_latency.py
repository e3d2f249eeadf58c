#!/usr/bin/env python3
"""Update-to-visible latency through the core-data stream, on the stack of
`./dev/run --detach`: puts a record that flips program 212313's `valid` on
the core-data stream (Kinesis PutRecord, as any producer does), then polls
the tracker until its answer flips; prints p50, p99 and max.

Usage: python3 bench/stream_latency.py [N]   (N changes, default 40)
"""
import base64, json, pathlib, sys, time, urllib.error, urllib.request

ENV = dict(
    line.split("=", 1)
    for line in (pathlib.Path(__file__).resolve().parent.parent / "dev/.stack.env").read_text().splitlines()
    if "=" in line
)
K = ENV["AWS_ENDPOINT_URL_KINESIS"] + "/"
T = ENV["TRACKER_URL"] + "/event/212313"
STREAM = ENV.get("CORE_DATA_STREAM", "adtrack-core-data")
def put(obj):
    body = {"StreamName": STREAM, "PartitionKey": "212313",
            "Data": base64.b64encode(json.dumps(obj).encode()).decode()}
    req = urllib.request.Request(K, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "Kinesis_20131202.PutRecord",
        "X-Amz-Date": "20260101T000000Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=local/20260101/us-east-1/kinesis/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=00"})
    urllib.request.urlopen(req).read()
def status():
    try: return urllib.request.urlopen(T).status
    except urllib.error.HTTPError as e: return e.code
lat = []
for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 40):
    valid = i % 2 == 1
    want = 200 if valid else 404
    t0 = time.monotonic()
    put({"programId": "212313", "programName": "program2", "checksum": "124", "customerId": "9124", "customerName": "Customer2", "valid": valid})
    while status() != want: time.sleep(0.002)
    lat.append((time.monotonic() - t0) * 1000)
lat.sort()
print("n=%d p50=%.0f ms p99=%.0f ms max=%.0f ms" % (len(lat), lat[len(lat)//2], lat[min(len(lat)-1, int(len(lat)*0.99))], lat[-1]))
