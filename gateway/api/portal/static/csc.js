"use strict";
// What every page that talks to the gateway from the browser shares: a JSON POST that turns an
// error answer into "code: detail", base64url decoding, and the check that a FIDO2 challenge
// commits to exactly the hashes shown (16 random bytes, then SHA-256 of the canonical binding:
// JSON with sorted keys, sorted hashes, no whitespace; docs/api.md).
window.HpkiCsc = (function () {
  const SHA256 = "2.16.840.1.101.3.4.2.1";

  async function post(path, body) {
    const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                 body: JSON.stringify(body)});
    let data = {};
    try { data = await r.json(); } catch (e) { data = {}; }
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

  async function bindingDigest(credentialID, oid, hashes, n) {
    const canonical = JSON.stringify({credentialID: credentialID, hashAlgorithmOID: oid,
                                      hashes: [...hashes].sort(), numSignatures: n});
    return new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(canonical)));
  }

  // authenticate/begin, refusing a challenge that does not commit to these hashes, then the
  // authenticator's assertion and credentials/authorize: the SAD for exactly these hashes.
  async function authorize(credentialID, oid, hashes) {
    const n = hashes.length;
    const begin = await post("/auth/fido2/authenticate/begin",
      {credentialID: credentialID, hashes: hashes, hashAlgorithmOID: oid, numSignatures: n});
    const tail = b64urlToBytes(begin.publicKey.challenge).slice(16);
    const expected = await bindingDigest(credentialID, oid, hashes, n);
    if (tail.length !== expected.length || tail.some((b, i) => b !== expected[i])) {
      throw new Error("the challenge does not commit to these hashes: refusing to approve");
    }
    const options = PublicKeyCredential.parseRequestOptionsFromJSON(begin.publicKey);
    const assertion = await navigator.credentials.get({publicKey: options});
    return await post("/csc/v2/credentials/authorize", {
      credentialID: credentialID, numSignatures: n, hashes: hashes, hashAlgorithmOID: oid,
      authData: [{id: "webauthn", value: JSON.stringify(assertion.toJSON())}]});
  }

  return {SHA256: SHA256, post: post, b64urlToBytes: b64urlToBytes, bindingDigest: bindingDigest,
          authorize: authorize};
})();
