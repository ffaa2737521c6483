"""A stand-in for the original tutorial's marketplace, for the benchmark's baseline: Flask on
Werkzeug's threaded server (as the tutorial ran it), one gRPC channel with mutual TLS to the
recommendations service, the three mystery books rendered into a small HTML page.

Usage: marketplace.py HTTP_PORT GRPC_PORT CERTS_DIR   (prints "python marketplace listening")
"""
import sys

import grpc
from flask import Flask, render_template_string

from recommendations_pb2 import BookCategory, RecommendationRequest
from recommendations_pb2_grpc import RecommendationsStub

PAGE = """<!doctype html>
<html><head><title>Online Books For You</title></head>
<body><h1>Mystery books you may like</h1>
<ul>{% for book in recommendations %}<li>{{ book.title }}</li>{% endfor %}</ul>
</body></html>"""


def main():
    http_port, grpc_port, certs = sys.argv[1], sys.argv[2], sys.argv[3]

    def read(name):
        with open(f"{certs}/{name}", "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    channel = grpc.secure_channel(
        f"localhost:{grpc_port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    client = RecommendationsStub(channel)
    app = Flask(__name__)

    @app.route("/")
    def render_homepage():
        request = RecommendationRequest(user_id=1, category=BookCategory.MYSTERY, max_results=3)
        response = client.Recommend(request)
        return render_template_string(PAGE, recommendations=response.recommendations)

    print("python marketplace listening", flush=True)
    app.run(host="127.0.0.1", port=int(http_port), threaded=True)


if __name__ == "__main__":
    main()
