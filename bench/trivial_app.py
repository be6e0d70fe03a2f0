"""The floor bench/http.py measures the service against: a Flask route that does nothing but answer a
small JSON body, served by the same gunicorn setup as the service. Not part of the product."""
from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/bench/trivial")
def trivial():
    return jsonify(status="ok", items=[1, 2, 3])
