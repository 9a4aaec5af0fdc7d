"use strict";
// FIDO2 registration on the portal: the only step of enrolment that needs JavaScript.
(function () {
  const form = document.getElementById("enroll");
  const statusEl = document.getElementById("status");
  function show(text, cls) { statusEl.textContent = text; statusEl.className = cls || ""; }

  async function enroll(code, password, label) {
    const begin = await HpkiCsc.post("/auth/fido2/register/begin", {enrollment_code: code, password: password});
    const options = PublicKeyCredential.parseCreationOptionsFromJSON(begin.publicKey);
    const credential = await navigator.credentials.create({publicKey: options});
    const body = {enrollment_code: code, credential: credential.toJSON()};
    if (label) { body.label = label; }
    return await HpkiCsc.post("/auth/fido2/register/complete", body);
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    show(form.dataset.confirm);
    try {
      const done = await enroll(document.getElementById("code").value.trim(),
                                document.getElementById("password").value,
                                document.getElementById("label").value.trim());
      show(form.dataset.done + done.credential_id, "ok");
      document.getElementById("password").value = "";
    } catch (e) {
      show(form.dataset.error + e.message, "error");
    }
  });
})();
