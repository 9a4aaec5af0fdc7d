"use strict";
// Approve one document with WebAuthn, then have the gateway sign it (CSC signDoc):
// authenticate/begin -> check the challenge commits to this document's hash ->
// navigator.credentials.get -> credentials/authorize -> signatures/signDoc -> download.
(function () {
  const OID = "2.16.840.1.101.3.4.2.1";
  const form = document.getElementById("sign");
  const statusEl = document.getElementById("sign-status");
  const link = document.getElementById("download-signed");
  function show(text, cls) { statusEl.textContent = text; statusEl.className = cls || ""; }

  async function post(path, body) {
    const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(body)});
    const data = await r.json();
    if (!r.ok) {
      const code = data.code || data.error || r.status;
      throw new Error(code + ": " + (data.detail || data.error_description || ("HTTP " + r.status)));
    }
    return data;
  }

  function b64urlToBytes(s) {
    const b64 = s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4);
    return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  }

  async function bindingDigest(credentialID, hashes) {
    const canonical = JSON.stringify({credentialID: credentialID, hashAlgorithmOID: OID,
                                      hashes: [...hashes].sort(), numSignatures: hashes.length});
    return new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(canonical)));
  }

  async function sign(credentialID, level) {
    const hashes = [form.dataset.hash];
    const begin = await post("/auth/fido2/authenticate/begin",
      {credentialID: credentialID, hashes: hashes, hashAlgorithmOID: OID, numSignatures: 1});
    const tail = b64urlToBytes(begin.publicKey.challenge).slice(16);
    const expected = await bindingDigest(credentialID, hashes);
    if (tail.length !== expected.length || tail.some((b, i) => b !== expected[i])) {
      throw new Error("the challenge does not commit to this document: refusing to approve");
    }
    const options = PublicKeyCredential.parseRequestOptionsFromJSON(begin.publicKey);
    const assertion = await navigator.credentials.get({publicKey: options});
    const auth = await post("/csc/v2/credentials/authorize", {
      credentialID: credentialID, numSignatures: 1, hashes: hashes, hashAlgorithmOID: OID,
      authData: [{id: "webauthn", value: JSON.stringify(assertion.toJSON())}]});
    const entry = {document: form.dataset.document, signature_format: "X",
                   conformance_level: level, profile: form.dataset.profile,
                   csv_encoding: form.dataset.encoding};
    if (form.dataset.prescription) { entry.prescription = form.dataset.prescription; }
    const signed = await post("/csc/v2/signatures/signDoc",
      {credentialID: credentialID, SAD: auth.SAD, documents: [entry]});
    return signed.DocumentWithSignature[0];
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    show("...");
    link.hidden = true;
    try {
      const b64 = await sign(document.getElementById("credential").value,
                             document.getElementById("level").value);
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      link.href = URL.createObjectURL(new Blob([bytes], {type: "application/xml"}));
      link.download = form.dataset.download;
      link.hidden = false;
      show(form.dataset.done + " (" + bytes.length + " bytes)", "ok");
      statusEl.dataset.done = "1";
    } catch (e) {
      show(form.dataset.error + e.message, "error");
      statusEl.dataset.done = "1";
    }
  });
})();
