//! Alipay and WeChat Pay played locally, for demos (`ipnctl fake-keys`, `ipnctl send --provider`)
//! and tests: their signing keys, and notifications signed (and for WeChat Pay encrypted)
//! exactly as they sign them. Never part of a production path: a real provider's private key is
//! never on our side.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine;
use encoding_rs::Encoding;

/// A provider's signing key, made here.
pub struct SigningKey(RsaKeyPair);

impl SigningKey {
    /// A new RSA-2048 key.
    pub fn generate() -> SigningKey {
        // Generating an RSA key only fails when the system has no randomness.
        SigningKey(RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key generation"))
    }

    /// The key stored at `path` (PKCS#8 DER), made and stored there first if there is none.
    pub fn at(path: &Path) -> anyhow::Result<SigningKey> {
        if !path.exists() {
            let key = SigningKey::generate();
            let der = key.0.as_der().context("cannot encode a key")?;
            std::fs::write(path, der.as_ref())
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let der = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let pair = RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| anyhow::anyhow!("{} is not a PKCS#8 RSA key: {e}", path.display()))?;
        Ok(SigningKey(pair))
    }

    /// The public key as PEM (SubjectPublicKeyInfo).
    pub fn public_pem(&self) -> String {
        // Encoding a public key of a valid pair cannot fail.
        let der = self.0.public_key().as_der().expect("SPKI");
        let base64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = base64
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap_or_default())
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// The public key as bare base64, as Alipay's console shows it.
    pub fn public_base64(&self) -> String {
        let der = self.0.public_key().as_der().expect("SPKI");
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    }

    /// SHA256withRSA (PKCS#1 v1.5), base64.
    pub fn sign(&self, message: &[u8]) -> String {
        let mut signature = vec![0; self.0.public_modulus_len()];
        let rng = aws_lc_rs::rand::SystemRandom::new();
        self.0
            .sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
            .expect("RSA signing");
        base64::engine::general_purpose::STANDARD.encode(signature)
    }
}

/// An Alipay notification body as Alipay posts it: `fields` (sign and sign_type added) with
/// each value's bytes in `charset` percent-encoded, signed over the sorted non-empty fields.
pub fn alipay_notification(
    key: &SigningKey,
    fields: &[(&str, &str)],
    charset: &'static Encoding,
) -> Vec<u8> {
    let mut signed: Vec<&(&str, &str)> = fields.iter().filter(|(_, v)| !v.is_empty()).collect();
    signed.sort();
    let content: Vec<String> = signed.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let content = content.join("&");
    let (bytes, _, _) = charset.encode(&content);
    let sign = key.sign(&bytes);
    let mut all: Vec<(&str, &str)> = fields.to_vec();
    all.push(("sign_type", "RSA2"));
    all.push(("sign", &sign));
    let pairs: Vec<String> = all
        .iter()
        .map(|(k, v)| {
            let (bytes, _, _) = charset.encode(v);
            let value: String =
                percent_encoding::percent_encode(&bytes, percent_encoding::NON_ALPHANUMERIC)
                    .collect();
            format!("{k}={value}")
        })
        .collect();
    pairs.join("&").into_bytes()
}

/// A random alphanumeric text of `n` characters (nonces, APIv3 keys).
pub fn random_text(n: usize) -> String {
    (0..n).map(|_| fastrand::alphanumeric()).collect()
}

/// A WeChat Pay notification body: `resource` encrypted with `apiv3_key` (AES-256-GCM, a fresh
/// 12-character nonce, `original_type` as associated data) in the v3 envelope.
pub fn wechatpay_body(
    apiv3_key: &str,
    id: &str,
    event_type: &str,
    original_type: &str,
    resource: &serde_json::Value,
) -> anyhow::Result<Vec<u8>> {
    let nonce = random_text(12);
    let key = UnboundKey::new(&AES_256_GCM, apiv3_key.as_bytes())
        .map_err(|_| anyhow::anyhow!("the APIv3 key must be 32 bytes"))?;
    let mut data = resource.to_string().into_bytes();
    LessSafeKey::new(key)
        .seal_in_place_append_tag(
            Nonce::try_assume_unique_for_key(nonce.as_bytes()).expect("12 bytes"),
            Aad::from(original_type.as_bytes()),
            &mut data,
        )
        .map_err(|_| anyhow::anyhow!("cannot encrypt"))?;
    let ciphertext = base64::engine::general_purpose::STANDARD.encode(data);
    let summary = if event_type.starts_with("REFUND.") {
        "退款成功"
    } else {
        "支付成功"
    };
    Ok(serde_json::json!({
        "id": id,
        "create_time": "2026-12-01T10:00:01+08:00",
        "resource_type": "encrypt-resource",
        "event_type": event_type,
        "summary": summary,
        "resource": {
            "original_type": original_type,
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": ciphertext,
            "associated_data": original_type,
            "nonce": nonce,
        }
    })
    .to_string()
    .into_bytes())
}

/// A WeChat Pay transaction resource (`TRANSACTION.SUCCESS`) of 88.00 CNY paid by JSAPI, as
/// the decrypted resource reads.
pub fn wechatpay_transaction(
    mch_id: &str,
    app_id: &str,
    out_trade_no: &str,
    transaction_id: &str,
) -> serde_json::Value {
    serde_json::json!({
        "mchid": mch_id,
        "appid": app_id,
        "out_trade_no": out_trade_no,
        "transaction_id": transaction_id,
        "trade_type": "JSAPI",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "bank_type": "CMC",
        "success_time": "2026-12-01T10:00:00+08:00",
        "payer": { "openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o" },
        "amount": { "total": 8800, "payer_total": 8800, "currency": "CNY", "payer_currency": "CNY" }
    })
}

/// Request headers as WeChat Pay sends them: name, value.
pub type Headers = Vec<(&'static str, String)>;

/// The headers WeChat Pay sends with `body`, signed at `timestamp` under `serial`.
pub fn wechatpay_headers(
    key: &SigningKey,
    serial: &str,
    body: &[u8],
    timestamp: u64,
) -> Vec<(&'static str, String)> {
    let nonce = random_text(32);
    let mut message = format!("{timestamp}\n{nonce}\n").into_bytes();
    message.extend_from_slice(body);
    message.push(b'\n');
    vec![
        ("Wechatpay-Timestamp", timestamp.to_string()),
        ("Wechatpay-Nonce", nonce),
        ("Wechatpay-Signature", key.sign(&message)),
        ("Wechatpay-Serial", serial.to_owned()),
        (
            "Wechatpay-Signature-Type",
            "WECHATPAY2-SHA256-RSA2048".to_owned(),
        ),
    ]
}

/// Seconds since the epoch, now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The serial the demo WeChat Pay key is configured under.
pub const DEMO_SERIAL: &str = "PUB_KEY_ID_0000DEMO0000000000000000000000";

/// The demo keys of `ipnctl fake-keys`: made once in a directory, then reused.
pub struct DemoKeys {
    /// Alipay's signing key.
    pub alipay: SigningKey,
    /// WeChat Pay's signing key.
    pub wechatpay: SigningKey,
    /// The merchant's APIv3 key.
    pub apiv3_key: String,
}

impl DemoKeys {
    /// The keys in `dir` (made there when missing), with each public half and the APIv3 key
    /// written beside them as files the bridge's config can name.
    pub fn at(dir: &Path) -> anyhow::Result<DemoKeys> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let alipay = SigningKey::at(&dir.join("alipay_private.pk8"))?;
        let wechatpay = SigningKey::at(&dir.join("wechatpay_private.pk8"))?;
        let apiv3_path = dir.join("wechatpay_apiv3_key");
        if !apiv3_path.exists() {
            std::fs::write(&apiv3_path, random_text(32))
                .with_context(|| format!("cannot write {}", apiv3_path.display()))?;
        }
        let apiv3_key = std::fs::read_to_string(&apiv3_path)
            .with_context(|| format!("cannot read {}", apiv3_path.display()))?
            .trim()
            .to_owned();
        for (name, text) in [
            ("alipay_public.pem", alipay.public_pem()),
            ("wechatpay_public.pem", wechatpay.public_pem()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(DemoKeys {
            alipay,
            wechatpay,
            apiv3_key,
        })
    }

    /// A WeChat Pay notification of `resource` as WeChat Pay sends it with these keys: its body
    /// (encrypted under the APIv3 key, a new id) and its headers (signed now under
    /// [`DEMO_SERIAL`]).
    pub fn wechatpay_notification(
        &self,
        event_type: &str,
        original_type: &str,
        resource: &serde_json::Value,
    ) -> anyhow::Result<(Vec<u8>, Headers)> {
        let id = uuid::Uuid::now_v7().to_string();
        let body = wechatpay_body(&self.apiv3_key, &id, event_type, original_type, resource)?;
        let headers = wechatpay_headers(&self.wechatpay, DEMO_SERIAL, &body, now());
        Ok((body, headers))
    }
}
