"use strict";
// The reference approval page (/approve): a challenge bound to the hashes typed in, checked to
// commit to exactly them, approved by the authenticator, then CSC signHash.
(function () {
  const resultEl = document.getElementById("result");

  async function approve(credentialID, oid, hashes) {
    const auth = await HpkiCsc.authorize(credentialID, oid, hashes);
    const signed = await HpkiCsc.post("/csc/v2/signatures/signHash", {
      credentialID: credentialID, SAD: auth.SAD, hashes: hashes, hashAlgorithmOID: oid,
      signAlgo: "1.2.840.113549.1.1.1"});
    return {expiresIn: auth.expiresIn, signatures: signed.signatures};
  }

  document.getElementById("approve").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    resultEl.className = "";
    resultEl.textContent = "Confirm on your authenticator...";
    try {
      const hashes = document.getElementById("hashes").value.split(/\s+/).filter((h) => h);
      const out = await approve(document.getElementById("credential").value.trim(),
                                document.getElementById("alg").value.trim(), hashes);
      resultEl.textContent = JSON.stringify(out);
    } catch (e) {
      resultEl.className = "error";
      resultEl.textContent = "error: " + e.message;
    }
    resultEl.dataset.done = "1";
  });
})();
