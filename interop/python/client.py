"""The original tutorial's Python client, pointed at our Rust recommendations service.

Usage: client.py HOST:PORT CERTS_DIR
Exits non-zero (with a message) if anything does not behave as the original contract says.
"""
import sys

import grpc

from recommendations_pb2 import BookCategory, RecommendationRequest
from recommendations_pb2_grpc import RecommendationsStub


def credentials(certs, with_identity=True):
    def read(name):
        with open(f"{certs}/{name}", "rb") as f:
            return f.read()

    if with_identity:
        return grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    return grpc.ssl_channel_credentials(read("ca.pem"))


def main():
    target, certs = sys.argv[1], sys.argv[2]
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(target, credentials(certs), options) as channel:
        client = RecommendationsStub(channel)
        reply = client.Recommend(
            RecommendationRequest(user_id=1, category=BookCategory.MYSTERY, max_results=3), timeout=5
        )
        titles = sorted(b.title for b in reply.recommendations)
        assert titles == [
            "Murder on the Orient Express",
            "The Hound of the Baskervilles",
            "The Maltese Falcon",
        ], titles
        print("python client: 3 mystery books:", titles)

        for request, code, message in [
            (RecommendationRequest(user_id=1, category=7, max_results=1),
             grpc.StatusCode.NOT_FOUND, "Category not found"),
            (RecommendationRequest(user_id=1, category=BookCategory.MYSTERY, max_results=-1),
             grpc.StatusCode.INVALID_ARGUMENT, "max_results must be between 0 and 1000, got -1"),
        ]:
            try:
                client.Recommend(request, timeout=5)
                sys.exit(f"expected {code} for {request}")
            except grpc.RpcError as e:
                assert (e.code(), e.details()) == (code, message), (e.code(), e.details())
                print(f"python client: {code.name}: {e.details()}")

    # Without a client certificate the call must be refused.
    with grpc.secure_channel(target, credentials(certs, with_identity=False), options) as channel:
        try:
            RecommendationsStub(channel).Recommend(
                RecommendationRequest(user_id=1, category=BookCategory.MYSTERY, max_results=1), timeout=5
            )
            sys.exit("a client without a certificate was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.code()
            print("python client without a certificate: refused:", e.code().name)


if __name__ == "__main__":
    main()
