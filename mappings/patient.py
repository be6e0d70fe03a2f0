"""Client ⇄ US Core Patient."""
from __future__ import annotations

from typing import Optional

from mappings import codes, ids
from mappings.common import (
    DATA_ABSENT_REASON, Copy, concept_text, copy_in, copy_out, extension_value, find_coding, profile,
    telecom, telecom_value,
)
from service.domain import SSN_SYSTEMS, Address, Client, Contact, Identifier, PersonName

COPIES = [Copy("birth_date", "birthDate")]
NAME_COPIES = [Copy("family", "family"), Copy("text", "text")]
ADDRESS_COPIES = [Copy("city", "city"), Copy("state", "state"), Copy("postal_code", "postalCode"),
                  Copy("country", "country")]
UNKNOWN = {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}


def to_fhir(client: Client, patient_id: str) -> dict:
    patient: dict = {"resourceType": "Patient", "id": patient_id, "meta": profile("us-core-patient")}
    if client.interpreter_needed is not None:
        patient["extension"] = [{"url": ids.EXT_INTERPRETER_REQUIRED,
                                 "valueBoolean": client.interpreter_needed}]
    identifiers = [identifier_to_fhir(i) for i in client.identifiers]
    if client.id:
        identifiers.insert(0, {"system": ids.SID_CLIENT, "value": client.id})
    patient["identifier"] = identifiers or [{"use": "temp", **UNKNOWN}]
    names = [name_to_fhir(n) for n in client.names]
    if client.preferred_name:
        names.append({"use": "usual", "text": client.preferred_name})
    patient["name"] = names or [UNKNOWN]
    if client.phone or client.email:
        patient["telecom"] = telecom(client.phone, client.email)
    if client.gender:
        patient["gender"] = codes.GENDER.fhir(client.gender)
    else:
        patient["_gender"] = UNKNOWN
    copy_out(client, COPIES, patient)
    if client.address:
        patient["address"] = [address_to_fhir(client.address)]
    if client.emergency_contact:
        patient["contact"] = [contact_to_fhir(client.emergency_contact)]
    if client.language:
        patient["communication"] = [{"language": {"coding": [{"system": codes.URN_LANGUAGE,
                                                              "code": client.language}]},
                                     "preferred": True}]
    return patient


def identifier_to_fhir(ident: Identifier) -> dict:
    out: dict = {}
    if ident.kind != "other":
        out["type"] = {"coding": [codes.IDENTIFIER_KIND.coding(ident.kind)]}
    out["system"] = ident.system
    out["value"] = ident.value
    return out


def name_to_fhir(name: PersonName) -> dict:
    out: dict = {}
    copy_out(name, NAME_COPIES, out)
    for part in ("given", "prefix", "suffix"):
        if getattr(name, part):
            out[part] = list(getattr(name, part))
    return out


def address_to_fhir(address: Address) -> dict:
    out: dict = {"line": list(address.lines)} if address.lines else {}
    copy_out(address, ADDRESS_COPIES, out)
    return out


def contact_to_fhir(contact: Contact) -> dict:
    relationship = [{"coding": [codes.EMERGENCY_CONTACT]}]
    if contact.relationship:
        relationship.append({"text": contact.relationship})
    out: dict = {"relationship": relationship, "name": {"text": contact.name}}
    if contact.phone or contact.email:
        out["telecom"] = telecom(contact.phone, contact.email)
    return out


def from_fhir(patient: dict) -> Client:
    client = Client(**copy_in(patient, COPIES))
    for ident in patient.get("identifier", ()):
        system, value = ident.get("system"), ident.get("value")
        if system == ids.SID_CLIENT:
            client.id = value
        elif system and value and system not in SSN_SYSTEMS and system != ids.SID_CASE:
            kind = codes.IDENTIFIER_KIND.internal(find_coding(ident.get("type"), codes.IDENTIFIER_TYPE))
            client.identifiers.append(Identifier(kind=kind, system=system, value=value))
    for name in patient.get("name", ()):
        if name.get("use") == "usual" and set(name) <= {"use", "text"} and client.preferred_name is None:
            client.preferred_name = name.get("text")
        elif _has_name_parts(name):
            client.names.append(name_from_fhir(name))
    if "gender" in patient:
        client.gender = codes.GENDER.internal(patient["gender"])
    client.phone = telecom_value(patient.get("telecom"), "phone")
    client.email = telecom_value(patient.get("telecom"), "email")
    if patient.get("address"):
        client.address = address_from_fhir(patient["address"][0])
    client.emergency_contact = _emergency_contact(patient.get("contact", ()))
    client.language = _preferred_language(patient.get("communication", ()))
    client.interpreter_needed = extension_value(patient, ids.EXT_INTERPRETER_REQUIRED, "valueBoolean")
    return client


def _has_name_parts(name: dict) -> bool:
    return any(name.get(k) for k in ("family", "given", "text", "prefix", "suffix"))


def name_from_fhir(name: dict) -> PersonName:
    return PersonName(**copy_in(name, NAME_COPIES), given=list(name.get("given", ())),
                      prefix=list(name.get("prefix", ())), suffix=list(name.get("suffix", ())))


def address_from_fhir(address: dict) -> Address:
    return Address(**copy_in(address, ADDRESS_COPIES), lines=list(address.get("line", ())))


def _emergency_contact(contacts) -> Optional[Contact]:
    fallback = None
    for contact in contacts:
        roles = contact.get("relationship", ())
        name = (contact.get("name") or {})
        words = name.get("text") or " ".join([*name.get("given", ()), name.get("family", "")]).strip()
        if not words:
            continue
        found = Contact(
            name=words,
            relationship=next((r["text"] for r in roles if r.get("text") and not r.get("coding")), None)
            or next((concept_text(r) for r in roles if not _is_emergency(r)), None),
            phone=telecom_value(contact.get("telecom"), "phone"),
            email=telecom_value(contact.get("telecom"), "email"),
        )
        if any(_is_emergency(r) for r in roles):
            return found
        fallback = fallback or found
    return fallback


def _is_emergency(role: dict) -> bool:
    return any(c.get("system") == codes.CONTACT_ROLE and c.get("code") in ("C", "EP")
               for c in role.get("coding", ()))


def _preferred_language(communications) -> Optional[str]:
    chosen = None
    for comm in communications:
        code = find_coding(comm.get("language"), codes.URN_LANGUAGE) or concept_text(comm.get("language"))
        if comm.get("preferred"):
            return code
        chosen = chosen or code
    return chosen
