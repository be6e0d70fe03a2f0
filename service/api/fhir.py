from flask import Blueprint

bp = Blueprint("fhir", __name__)
