"use strict";
// Approve one document with WebAuthn, then have the gateway sign it (CSC signDoc):
// authenticate/begin -> check the challenge commits to this document's hash ->
// navigator.credentials.get -> credentials/authorize -> signatures/signDoc -> download.
(function () {
  const form = document.getElementById("sign");
  const statusEl = document.getElementById("sign-status");
  const link = document.getElementById("download-signed");
  function show(text, cls) { statusEl.textContent = text; statusEl.className = cls || ""; }

  async function sign(credentialID, level) {
    const auth = await HpkiCsc.authorize(credentialID, HpkiCsc.SHA256, [form.dataset.hash]);
    const entry = {document: form.dataset.document, signature_format: "X",
                   conformance_level: level, profile: form.dataset.profile,
                   csv_encoding: form.dataset.encoding};
    if (form.dataset.prescription) { entry.prescription = form.dataset.prescription; }
    const signed = await HpkiCsc.post("/csc/v2/signatures/signDoc",
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
