"""The portal's words in Japanese (first) and English.

One table per language with the same keys; ``tests/unit/test_portal_i18n.py`` checks that both
have every key, so a page never shows a key name. The language is chosen by ``?lang=ja|en``
and remembered in the ``portal_lang`` cookie; without either, Japanese.
"""

from __future__ import annotations

from typing import Final

LANGS: Final = ("ja", "en")
DEFAULT_LANG: Final = "ja"
COOKIE: Final = "portal_lang"

JA: dict[str, str] = {
    "title": "HPKI 署名ゲートウェイ 検証環境",
    "sandbox_banner": "検証環境（TEST 証明書のみ）",
    "production_banner": "本番環境",
    "nav": "ポータルのメニュー",
    "nav_status": "状態",
    "nav_enrol": "認証器の登録",
    "nav_sign": "署名",
    "nav_verify": "検証",
    "nav_downloads": "ダウンロード",
    "nav_api": "API 仕様",
    "switch_lang": "English",
    "status_heading": "接続状態",
    "you_are": "接続しているクライアント",
    "kind": "種別",
    "kind_facility": "医療機関・薬局",
    "kind_admin": "管理者",
    "kind_vendor": "ベンダー",
    "facility": "施設",
    "institution_code": "医療機関コード",
    "cert_serial": "クライアント証明書のシリアル",
    "cert_expiry": "クライアント証明書の有効期限",
    "days_left": "残り日数",
    "signers_heading": "署名者と資格情報",
    "signer": "署名者",
    "role": "資格",
    "status": "状態",
    "credential": "資格情報 (credentialID)",
    "certificate_until": "証明書の有効期限",
    "presence": "本人確認の方法",
    "presence_fido2": "FIDO2 認証器",
    "presence_jpki": "マイナンバーカード",
    "presence_none": "未登録（認証器またはカードの登録が必要）",
    "no_signers": "この施設に署名者は登録されていません。",
    "endpoints_heading": "接続先",
    "endpoint": "名称",
    "url": "URL",
    "tsa": "タイムスタンプ局 (TSA)",
    "ocsp": "OCSP レスポンダ",
    "crl": "CRL 配布点",
    "not_configured": "未設定",
    "hsm_heading": "HSM の状態",
    "hsm_ok": "利用可能",
    "hsm_down": "利用不可",
    "enrol_heading": "認証器の登録 (FIDO2)",
    "enrol_intro": (
        "別々に受け取った登録コードとパスワードを入力し、認証器（指紋・顔・PIN）で確認して"
        "ください。パスワードを 5 回間違えると登録コードはロックされます。"
    ),
    "enrol_code": "登録コード",
    "enrol_password": "パスワード",
    "enrol_label": "この認証器の名前（任意）",
    "enrol_submit": "登録する",
    "enrol_confirm": "認証器で確認してください…",
    "enrol_done": "登録しました: ",
    "enrol_card_heading": "マイナンバーカードによる本人確認",
    "enrol_card_intro": (
        "FIDO2 認証器の代わりに、マイナンバーカードの利用者証明用電子証明書で本人確認する"
        "こともできます。カードの登録には施設の PC のカード読取りクライアントを使います:"
    ),
    "mynumber_heading": "マイナンバーカードの登録",
    "mynumber_intro": (
        "署名のたびの本人確認に、マイナンバーカードの利用者証明用電子証明書（暗証番号 4 桁）を"
        "使えます。カードは施設の PC の IC カードリーダーに置き、カード読取りクライアント"
        "（hpki-gateway card）がカードにチャレンジへの署名をさせます。カードのそれ以外の情報は"
        "使いません。"
    ),
    "mynumber_browser_cannot": (
        "ブラウザは IC カードリーダーにアクセスできないため、カードの登録と署名の承認はこの"
        "ページではできません。カード読取りクライアントを入れた PC で行ってください。この"
        "ページでは手順と、署名者ごとのカードの登録状態を確認できます。"
    ),
    "mynumber_disabled": (
        "このゲートウェイではマイナンバーカードによる本人確認は無効です (jpki.enabled = false)。"
    ),
    "mynumber_where_heading": "どこで何ができるか",
    "mynumber_step": "手順",
    "mynumber_browser": "ブラウザ（このポータル）",
    "mynumber_client": "カード読取りクライアント",
    "mynumber_step_status": "カードの登録状態の確認",
    "mynumber_step_fido2": "FIDO2 認証器の登録",
    "mynumber_step_enrol": "マイナンバーカードの登録（カードが必要）",
    "mynumber_step_authorize": "署名の承認（カードと暗証番号が必要）",
    "mynumber_by_doctor_heading": "医師本人による登録（登録コードとパスワード）",
    "mynumber_by_doctor_1": (
        "担当者から登録コードとパスワードを別々に受け取ります（FIDO2 と同じ登録コード: "
        "hpki-gateway signer enroll-code）。"
    ),
    "mynumber_by_doctor_2": (
        "IC カードリーダーに接続した PC でカードを置き、hpki-gateway card status でカードが"
        "マイナンバーカードとして読めることと暗証番号の残り回数を確認します（回数は減りません）。"
    ),
    "mynumber_by_doctor_3": (
        "hpki-gateway card enroll を実行し、暗証番号を入力します（画面に表示されず、記録も"
        "されません）。クライアントはカードの証明書を読み、登録のチャレンジにカードで署名して"
        "（所持の証明）ゲートウェイに送ります。"
    ),
    "mynumber_label_example": "診察室のカード",
    "mynumber_by_doctor_after": (
        "ゲートウェイは署名・証明書パス（鍵で照合）・有効期限・失効を確認し、公開鍵と"
        "（発行者・シリアル）で署名者に結び付けて監査ログに記録します。1 人に複数のカードを"
        "登録できます。カードを更新したら再登録が必要です。"
    ),
    "mynumber_by_officer_heading": "担当者による登録（本人確認の後）",
    "mynumber_by_officer": (
        "担当者が本人確認をしたうえで、カードから読んだ証明書を署名者に結び付けます。"
    ),
    "mynumber_by_officer_api": "管理 API:",
    "mynumber_approve_heading": "署名の承認",
    "mynumber_approve": (
        "署名のたびに、施設のシステムまたは hpki-gateway card authorize が、署名する文書の"
        "ハッシュに結び付いたチャレンジを受け取り、暗証番号の入力後にカードで署名して SAD を"
        "得ます（Python からも gateway.card.client として呼べます）。"
    ),
    "mynumber_links_heading": "署名者ごとの登録状態",
    "mynumber_cards": "登録されたマイナンバーカード",
    "mynumber_linked": "登録済み",
    "mynumber_not_linked": "未登録",
    "mynumber_serial": "証明書シリアル",
    "mynumber_linked_at": "登録日",
    "mynumber_last_used": "最終使用日",
    "mynumber_virtual_heading": "検証環境の仮想マイナンバーカード",
    "mynumber_virtual": (
        "検証環境では、署名者ごとに仮想マイナンバーカードを本物の pcscd に挿せます。"
        "カード読取りクライアントは下の PCSCLITE_CSOCK_NAME を設定すると、そのカードを"
        "実物と同じように使えます。"
    ),
    "mynumber_pin_in_manifest": "暗証番号は manifest.json の cards[].pin",
    "mynumber_reader": "カードリーダー",
    "mynumber_virtual_down": (
        "仮想カードは起動していません（hpki-gateway sandbox cards up で起動します）。"
    ),
    "js_needed": "この操作には JavaScript と WebAuthn が必要です。",
    "error": "エラー: ",
    "sign_heading": "署名",
    "sign_intro": (
        "見本の処方箋・調剤結果を選ぶか、CSV または未署名の文書をアップロードしてください。"
        "文書のハッシュと、認証器で承認する内容を確認してから署名します。"
    ),
    "sign_pick": "文書を選ぶ",
    "sample_prescription": "見本の処方箋 (CSV)",
    "sample_dispensing": "見本の調剤結果 (CSV、署名済み処方箋を含む)",
    "upload": "ファイルをアップロード",
    "upload_kind": "文書の種類",
    "kind_prescription_csv": "処方箋 CSV",
    "kind_dispensing_csv": "調剤結果 CSV（署名済み処方箋が必要）",
    "signed_prescription": "署名済み処方箋 XML（調剤結果のみ）",
    "csv_encoding": "CSV の文字コード",
    "show_document": "内容を確認する",
    "document_heading": "署名する文書",
    "document_name": "文書",
    "document_profile": "プロファイル",
    "document_size": "サイズ（バイト）",
    "document_preview": "内容",
    "hash_sha256_b64": "SHA-256 (base64)",
    "hash_sha256_hex": "SHA-256 (16 進)",
    "approve_heading": "認証器が承認する内容",
    "approve_intro": (
        "ゲートウェイのチャレンジは、次の正規化 JSON の SHA-256 に乱数 16 バイトを前置した"
        "ものです。ページはチャレンジがこの内容に一致することを確かめてから認証器に渡します。"
    ),
    "binding_json": "正規化 JSON",
    "binding_digest": "その SHA-256 (base64)",
    "choose_credential": "署名者の資格情報",
    "level": "署名レベル",
    "sign_submit": "認証器で承認して署名する",
    "sign_done": "署名しました",
    "download_signed": "署名済み XML をダウンロード",
    "verify_heading": "署名の検証",
    "verify_intro": (
        "署名済みの XML・PDF・CMS をアップロードしてください（分離署名の場合は署名対象の"
        "内容も）。ETSI EN 319 102-1 の判定と、その意味を表示します。"
    ),
    "verify_document": "署名済み文書 (XML / PDF / CMS)",
    "verify_content": "分離署名の署名対象（任意）",
    "verify_submit": "検証する",
    "report_heading": "検証結果",
    "report_download_json": "JSON でダウンロード",
    "report_download_pdf": "PDF でダウンロード",
    "indication": "判定",
    "sub_indication": "詳細判定",
    "meaning": "意味",
    "reason": "理由",
    "format": "形式",
    "validation_time": "検証時刻",
    "signature_n": "署名",
    "signer_subject": "署名者",
    "signer_role": "資格 (hcRole)",
    "signer_issuer": "証明書の発行者（シリアル）",
    "role_permitted": "文書に対して資格が適切か",
    "level_reached": "到達レベル",
    "signing_time": "署名時刻（申告）",
    "best_signature_time": "存在が証明された時刻",
    "proven_by": "証明の根拠",
    "timestamp": "タイムスタンプ",
    "chain": "証明書パス",
    "revocation": "失効確認",
    "references": "署名対象（参照）",
    "location": "署名の位置",
    "notes": "注記",
    "modification_level": "署名後の変更（PDF）",
    "modification_NONE": "なし",
    "modification_LTA_UPDATES": "検証情報・文書タイムスタンプの追加のみ",
    "modification_FORM_FILLING": "フォーム入力・追加の署名",
    "modification_ANNOTATIONS": "注釈の追加",
    "modification_OTHER": "内容の変更（署名された内容ではありません）",
    "document_type": "文書の種類",
    "yes": "はい",
    "no": "いいえ",
    "none": "なし",
    "downloads_heading": "ダウンロード",
    "downloads_intro": (
        "検証環境の設定ファイル、CA 証明書と CRL、クライアント証明書、見本の文書です。"
    ),
    "dl_manifest": "manifest.json（検証環境の一覧）",
    "dl_ca": "CA 証明書",
    "dl_crl": "CRL",
    "dl_p12": "クライアント証明書 (PKCS#12)",
    "dl_p12_password": "パスワード",
    "dl_samples": "見本の文書",
    "dl_samples_csv": "見本の CSV",
    "dl_valid": "正しい署名",
    "dl_broken": "意図的に壊した署名",
    "dl_sandbox_only": "ダウンロードは検証環境でのみ提供されます。",
    "file": "ファイル",
    "what": "内容",
    "api_heading": "API 仕様 (OpenAPI 3.1)",
    "api_intro": "ゲートウェイの全ルートの OpenAPI 文書です。",
    "api_json": "openapi.json を開く",
    "ind_TOTAL-PASSED": "署名は有効です。",
    "ind_TOTAL-FAILED": "署名は無効です（改ざん・失効・形式不正など）。",
    "ind_INDETERMINATE": "有効とも無効とも判断できません（情報不足・期限切れ等）。",
    "sub_FORMAT_FAILURE": "署名の形式が規格に合っていません。",
    "sub_HASH_FAILURE": "署名対象の内容が署名後に変更されています。",
    "sub_SIG_CRYPTO_FAILURE": "署名値が署名者の公開鍵で検証できません。",
    "sub_REVOKED": "署名者の証明書は失効しています。",
    "sub_REVOKED_NO_POE": "証明書は失効しており、失効前に署名された証拠がありません。",
    "sub_SIG_CONSTRAINTS_FAILURE": "署名の制約（資格・文書の種類など）を満たしていません。",
    "sub_CHAIN_CONSTRAINTS_FAILURE": "証明書パスが制約を満たしていません。",
    "sub_NO_CERTIFICATE_CHAIN_FOUND": "信頼できる認証局までの証明書パスが見つかりません。",
    "sub_NO_SIGNING_CERTIFICATE_FOUND": "署名者の証明書が見つかりません。",
    "sub_OUT_OF_BOUNDS_NO_POE": "証明書の有効期間外で、期間内の署名の証拠がありません。",
    "sub_OUT_OF_BOUNDS_NOT_REVOKED": "証明書の有効期間外です（失効はしていません）。",
    "sub_TRY_LATER": "失効情報が得られません。後で再度検証してください。",
    "sub_REVOCATION_OUT_OF_BOUNDS_NO_POE": "失効情報が有効期間外です。",
    "sub_CRYPTO_CONSTRAINTS_FAILURE_NO_POE": "使われた暗号アルゴリズムは現在許容されていません。",
    "sub_TIMESTAMP_ORDER_FAILURE": "タイムスタンプの順序が正しくありません。",
    "sub_SIGNED_DATA_NOT_FOUND": "署名対象のデータが見つかりません。",
    "sub_POLICY_PROCESSING_ERROR": "署名ポリシーを処理できません。",
    "sub_CERTIFICATE_CHAIN_GENERAL_FAILURE": "証明書パスの検証に失敗しました。",
    "sub_GENERIC": "その他の理由で判断できません。",
    "sub_unknown": "詳細は理由欄を参照してください。",
    "scenarios_heading": "障害シナリオ",
    "nav_scenarios": "障害シナリオ",
    "scenarios_intro": (
        "施設または資格情報ごとに障害を発生させ、ベンダーのシステムが受け取るエラーを確認"
        "できます（検証環境のみ）。ポータル自体はシナリオの影響を受けません。"
    ),
    "scenario": "シナリオ",
    "scenario_error": "返されるエラー",
    "scenario_state": "状態",
    "scenario_on": "有効にする",
    "scenario_off": "無効にする",
    "scenario_is_on": "有効",
    "scenario_is_off": "無効",
    "scenario_reset": "すべて元に戻す",
    "scenario_credential": "対象の資格情報",
    "scenarios_sandbox_only": "障害シナリオは検証環境でのみ使えます。",
}

EN: dict[str, str] = {
    "title": "HPKI signing gateway: verification environment",
    "sandbox_banner": "SANDBOX (TEST certificates only)",
    "production_banner": "Production",
    "nav": "Portal menu",
    "nav_status": "Status",
    "nav_enrol": "Enrol an authenticator",
    "nav_sign": "Sign",
    "nav_verify": "Verify",
    "nav_downloads": "Downloads",
    "nav_api": "API (OpenAPI)",
    "switch_lang": "日本語",
    "status_heading": "Status",
    "you_are": "Who you are",
    "kind": "Kind",
    "kind_facility": "Facility (clinic, hospital or pharmacy)",
    "kind_admin": "Administrator",
    "kind_vendor": "Vendor",
    "facility": "Facility",
    "institution_code": "Institution code",
    "cert_serial": "Client certificate serial",
    "cert_expiry": "Client certificate expires",
    "days_left": "Days left",
    "signers_heading": "Signers and credentials",
    "signer": "Signer",
    "role": "Role",
    "status": "Status",
    "credential": "Credential (credentialID)",
    "certificate_until": "Certificate valid until",
    "presence": "How presence is proven",
    "presence_fido2": "FIDO2 authenticator",
    "presence_jpki": "My Number card",
    "presence_none": "none yet (enrol an authenticator or a card)",
    "no_signers": "No signer is registered for this facility.",
    "endpoints_heading": "Endpoints",
    "endpoint": "Name",
    "url": "URL",
    "tsa": "Time-stamping authority (TSA)",
    "ocsp": "OCSP responder",
    "crl": "CRL distribution point",
    "not_configured": "not configured",
    "hsm_heading": "HSM",
    "hsm_ok": "available",
    "hsm_down": "unavailable",
    "enrol_heading": "Enrol an authenticator (FIDO2)",
    "enrol_intro": (
        "Enter the enrolment code and the password you received separately, then confirm on "
        "your authenticator (fingerprint, face or PIN). Five wrong passwords lock the code."
    ),
    "enrol_code": "Enrolment code",
    "enrol_password": "Password",
    "enrol_label": "Name for this authenticator (optional)",
    "enrol_submit": "Register",
    "enrol_confirm": "Confirm on your authenticator...",
    "enrol_done": "registered: ",
    "enrol_card_heading": "My Number card",
    "enrol_card_intro": (
        "Instead of a FIDO2 authenticator, a signer can prove presence with the My Number "
        "card's user-authentication certificate. A card is linked with the local card client "
        "on the facility PC:"
    ),
    "mynumber_heading": "Enrol a My Number card",
    "mynumber_intro": (
        "Presence at each signature can be proven with the My Number card's user-authentication "
        "certificate (4-digit PIN). The card sits in the facility PC's card reader and the "
        "local card client (hpki-gateway card) has it sign the gateway's challenge; nothing "
        "else of the card is used."
    ),
    "mynumber_browser_cannot": (
        "A browser cannot reach a card reader, so neither linking a card nor approving a "
        "signature with it can be done on this page: use the PC where the card client is "
        "installed. This page shows the steps and which cards each signer has linked."
    ),
    "mynumber_disabled": (
        "My Number card presence is disabled on this gateway (jpki.enabled = false)."
    ),
    "mynumber_where_heading": "What can be done where",
    "mynumber_step": "Step",
    "mynumber_browser": "Browser (this portal)",
    "mynumber_client": "Local card client",
    "mynumber_step_status": "See which cards are linked",
    "mynumber_step_fido2": "Enrol a FIDO2 authenticator",
    "mynumber_step_enrol": "Link a My Number card (needs the card)",
    "mynumber_step_authorize": "Approve a signature (needs the card and its PIN)",
    "mynumber_by_doctor_heading": "By the doctor (enrolment code and password)",
    "mynumber_by_doctor_1": (
        "Receive an enrolment code and a password separately from the officer (the same code "
        "as for FIDO2: hpki-gateway signer enroll-code)."
    ),
    "mynumber_by_doctor_2": (
        "On the PC with the card reader, put the card in and check with hpki-gateway card "
        "status that it reads as a My Number card and how many PIN tries are left (none is "
        "spent)."
    ),
    "mynumber_by_doctor_3": (
        "Run hpki-gateway card enroll and type the PIN (never shown, never logged). The client "
        "reads the card's certificate and has the card sign the enrolment challenge (proof of "
        "possession) for the gateway."
    ),
    "mynumber_label_example": "consulting room card",
    "mynumber_by_doctor_after": (
        "The gateway checks the signature, the path (anchors matched by key), validity and "
        "revocation, binds the card to the signer by public key and (issuer, serial), and "
        "audits it. A signer may link several cards; a renewed card needs a new link."
    ),
    "mynumber_by_officer_heading": "By an officer (after an identity check)",
    "mynumber_by_officer": (
        "After checking the doctor's identity, an officer links the certificate read from the "
        "card to the signer."
    ),
    "mynumber_by_officer_api": "Admin API:",
    "mynumber_approve_heading": "Approving a signature",
    "mynumber_approve": (
        "For each signature, the facility system or hpki-gateway card authorize gets a "
        "challenge bound to the hashes to be signed, has the card sign it after the PIN, and "
        "receives the SAD (also callable from Python as gateway.card.client)."
    ),
    "mynumber_links_heading": "Cards linked per signer",
    "mynumber_cards": "Linked My Number cards",
    "mynumber_linked": "linked",
    "mynumber_not_linked": "none linked",
    "mynumber_serial": "certificate serial",
    "mynumber_linked_at": "linked on",
    "mynumber_last_used": "last used",
    "mynumber_virtual_heading": "The sandbox's virtual My Number cards",
    "mynumber_virtual": (
        "In the sandbox, each signer's virtual My Number card can be put into a real pcscd. "
        "With PCSCLITE_CSOCK_NAME set as below, the card client uses it as it would a real "
        "card."
    ),
    "mynumber_pin_in_manifest": "the PIN is cards[].pin in manifest.json",
    "mynumber_reader": "Reader",
    "mynumber_virtual_down": (
        "The virtual cards are not running (start them with hpki-gateway sandbox cards up)."
    ),
    "js_needed": "This step needs JavaScript and WebAuthn.",
    "error": "error: ",
    "sign_heading": "Sign",
    "sign_intro": (
        "Pick a sample prescription or dispensing result, or upload a CSV or an unsigned "
        "document. Check the document's hash and what your authenticator will approve, then sign."
    ),
    "sign_pick": "Choose a document",
    "sample_prescription": "Sample prescription (CSV)",
    "sample_dispensing": "Sample dispensing result (CSV, embeds a signed prescription)",
    "upload": "Upload a file",
    "upload_kind": "Kind of document",
    "kind_prescription_csv": "Prescription CSV",
    "kind_dispensing_csv": "Dispensing result CSV (needs the signed prescription)",
    "signed_prescription": "Signed prescription XML (dispensing results only)",
    "csv_encoding": "CSV encoding",
    "show_document": "Show the document",
    "document_heading": "The document to sign",
    "document_name": "Document",
    "document_profile": "Profile",
    "document_size": "Size (bytes)",
    "document_preview": "Content",
    "hash_sha256_b64": "SHA-256 (base64)",
    "hash_sha256_hex": "SHA-256 (hex)",
    "approve_heading": "What your authenticator approves",
    "approve_intro": (
        "The gateway's challenge is 16 random bytes followed by the SHA-256 of the canonical "
        "JSON below. This page checks that the challenge commits to it before your "
        "authenticator sees it."
    ),
    "binding_json": "Canonical JSON",
    "binding_digest": "Its SHA-256 (base64)",
    "choose_credential": "Signer's credential",
    "level": "Signature level",
    "sign_submit": "Approve on the authenticator and sign",
    "sign_done": "Signed",
    "download_signed": "Download the signed XML",
    "verify_heading": "Verify a signature",
    "verify_intro": (
        "Upload a signed XML, PDF or CMS (and, for a detached signature, the signed content). "
        "You get the ETSI EN 319 102-1 indication and what it means."
    ),
    "verify_document": "Signed document (XML / PDF / CMS)",
    "verify_content": "Signed content of a detached signature (optional)",
    "verify_submit": "Verify",
    "report_heading": "Verification report",
    "report_download_json": "Download as JSON",
    "report_download_pdf": "Download as PDF",
    "indication": "Indication",
    "sub_indication": "Sub-indication",
    "meaning": "Meaning",
    "reason": "Reason",
    "format": "Format",
    "validation_time": "Validated at",
    "signature_n": "Signature",
    "signer_subject": "Signer",
    "signer_role": "Role (hcRole)",
    "signer_issuer": "Certificate issuer (serial)",
    "role_permitted": "Role fits the document",
    "level_reached": "Level reached",
    "signing_time": "Signing time (claimed)",
    "best_signature_time": "Proven to exist at",
    "proven_by": "Proven by",
    "timestamp": "Time-stamp",
    "chain": "Certificate path",
    "revocation": "Revocation",
    "references": "What is signed (references)",
    "location": "Where the signature sits",
    "notes": "Notes",
    "modification_level": "Changed after signing (PDF)",
    "modification_NONE": "nothing",
    "modification_LTA_UPDATES": "validation data and document time-stamps added only",
    "modification_FORM_FILLING": "form fields filled, further signatures",
    "modification_ANNOTATIONS": "annotations added",
    "modification_OTHER": "the content changed (not what was signed)",
    "document_type": "Document type",
    "yes": "yes",
    "no": "no",
    "none": "none",
    "downloads_heading": "Downloads",
    "downloads_intro": (
        "The sandbox's manifest, CA certificates and CRLs, client certificates and sample "
        "documents."
    ),
    "dl_manifest": "manifest.json (the sandbox's inventory)",
    "dl_ca": "CA certificates",
    "dl_crl": "CRLs",
    "dl_p12": "Client certificates (PKCS#12)",
    "dl_p12_password": "Password",
    "dl_samples": "Sample documents",
    "dl_samples_csv": "Sample CSVs",
    "dl_valid": "valid signature",
    "dl_broken": "deliberately broken signature",
    "dl_sandbox_only": "Downloads are offered in a sandbox only.",
    "file": "File",
    "what": "What",
    "api_heading": "API (OpenAPI 3.1)",
    "api_intro": "The OpenAPI document of every route of the gateway.",
    "api_json": "Open openapi.json",
    "ind_TOTAL-PASSED": "The signature is valid.",
    "ind_TOTAL-FAILED": "The signature is invalid (altered, revoked, malformed...).",
    "ind_INDETERMINATE": "Neither valid nor invalid can be shown (missing data, expired...).",
    "sub_FORMAT_FAILURE": "The signature does not follow its format.",
    "sub_HASH_FAILURE": "The signed content was changed after signing.",
    "sub_SIG_CRYPTO_FAILURE": "The signature value does not verify with the signer's key.",
    "sub_REVOKED": "The signer's certificate is revoked.",
    "sub_REVOKED_NO_POE": "The certificate is revoked and nothing proves a signature before.",
    "sub_SIG_CONSTRAINTS_FAILURE": "The signature breaks a constraint (role, document type...).",
    "sub_CHAIN_CONSTRAINTS_FAILURE": "The certificate path breaks a constraint.",
    "sub_NO_CERTIFICATE_CHAIN_FOUND": "No path to a trusted CA was found.",
    "sub_NO_SIGNING_CERTIFICATE_FOUND": "The signer's certificate was not found.",
    "sub_OUT_OF_BOUNDS_NO_POE": "Outside the certificate's validity, with no proof of earlier.",
    "sub_OUT_OF_BOUNDS_NOT_REVOKED": "Outside the certificate's validity (not revoked).",
    "sub_TRY_LATER": "No revocation information yet: verify again later.",
    "sub_REVOCATION_OUT_OF_BOUNDS_NO_POE": "The revocation information is out of its validity.",
    "sub_CRYPTO_CONSTRAINTS_FAILURE_NO_POE": "An algorithm used is no longer accepted.",
    "sub_TIMESTAMP_ORDER_FAILURE": "The time-stamps are out of order.",
    "sub_SIGNED_DATA_NOT_FOUND": "The signed data was not found.",
    "sub_POLICY_PROCESSING_ERROR": "The signature policy cannot be processed.",
    "sub_CERTIFICATE_CHAIN_GENERAL_FAILURE": "The certificate path did not validate.",
    "sub_GENERIC": "Undecided for another reason.",
    "sub_unknown": "See the reason.",
    "scenarios_heading": "Failure scenarios",
    "nav_scenarios": "Scenarios",
    "scenarios_intro": (
        "Switch a failure on for your facility or one credential and see the error a vendor's "
        "system receives (sandbox only). The portal itself is never affected."
    ),
    "scenario": "Scenario",
    "scenario_error": "Error returned",
    "scenario_state": "State",
    "scenario_on": "Switch on",
    "scenario_off": "Switch off",
    "scenario_is_on": "on",
    "scenario_is_off": "off",
    "scenario_reset": "Reset all",
    "scenario_credential": "Credential",
    "scenarios_sandbox_only": "Failure scenarios exist only in a sandbox.",
}

MESSAGES: dict[str, dict[str, str]] = {"ja": JA, "en": EN}


def pick(query: str | None, cookie: str | None) -> str:
    for value in (query, cookie):
        if value in LANGS:
            return value
    return DEFAULT_LANG


def explain_indication(lang: str, indication: str) -> str:
    return MESSAGES[lang].get(f"ind_{indication}", indication)


def explain_sub(lang: str, sub: str | None) -> str:
    if not sub:
        return ""
    m = MESSAGES[lang]
    return m.get(f"sub_{sub}", m["sub_unknown"])
