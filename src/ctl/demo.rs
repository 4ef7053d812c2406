//! `ipnctl fake-keys` and `ipnctl send --provider alipay|wechatpay`: Alipay and WeChat Pay
//! played locally with the demo keys ([`crate::fake_providers`]), for scripts/run and the
//! README's first run.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::fake_providers::{self, DEMO_SERIAL, DemoKeys};
use crate::form::Form;

/// What `ipnctl fake-keys DIR` prints: the variables that point both binaries at the demo keys.
pub fn demo_settings(dir: &Path) -> String {
    let dir = dir.display();
    [
        "IPN_ALIPAY__ENABLED=true".to_owned(),
        "IPN_ALIPAY__APP_ID=2021000000000000".to_owned(),
        format!("IPN_ALIPAY__PUBLIC_KEYS={dir}/alipay_public.pem"),
        "IPN_WECHATPAY__ENABLED=true".to_owned(),
        "IPN_WECHATPAY__MCH_IDS=1900000109".to_owned(),
        format!("IPN_WECHATPAY__APIV3_KEY={dir}/wechatpay_apiv3_key"),
        format!("IPN_WECHATPAY__PLATFORM_KEYS={DEMO_SERIAL}={dir}/wechatpay_public.pem"),
    ]
    .join("\n")
}

/// Signs the fields of `file` (a form, `name=value&…`, as Alipay would post it but unsigned) with
/// the demo Alipay key and posts it to `url`; returns status and answer.
pub async fn send_alipay(url: &str, keys: &Path, file: &Path) -> anyhow::Result<(u16, String)> {
    let keys = DemoKeys::at(keys)?;
    let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let form = Form::parse(text.trim_ascii());
    let decoded = form.decoded();
    let fields: Vec<(&str, &str)> = decoded
        .iter()
        .filter(|(name, _)| name != "sign" && name != "sign_type")
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let charset = form.charset().encoding;
    let body = fake_providers::alipay_notification(&keys.alipay, &fields, charset);
    post(url, "application/x-www-form-urlencoded", &[], body).await
}

/// Encrypts and signs the resource of `file` (`{"event_type": …, "resource": {…}}`) as WeChat Pay
/// would with the demo keys, and posts it to `url`; returns status and answer.
pub async fn send_wechatpay(url: &str, keys: &Path, file: &Path) -> anyhow::Result<(u16, String)> {
    let keys = DemoKeys::at(keys)?;
    let text = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let sample: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let event_type = sample["event_type"]
        .as_str()
        .context("the sample names no event_type")?;
    let original_type = if event_type.starts_with("REFUND.") {
        "refund"
    } else {
        "transaction"
    };
    let (body, headers) =
        keys.wechatpay_notification(event_type, original_type, &sample["resource"])?;
    post(url, "application/json", &headers, body).await
}

async fn post(
    url: &str,
    content_type: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> anyhow::Result<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot POST to {url}"))?;
    let status = response.status().as_u16();
    Ok((status, response.text().await.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_settings_enable_both_providers_with_the_demo_keys() {
        let dir = std::env::temp_dir().join(format!("ipn-demo-keys-{}", uuid::Uuid::now_v7()));
        let keys = DemoKeys::at(&dir).expect("keys made");
        let env: std::collections::BTreeMap<String, String> = demo_settings(&dir)
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        let config = crate::config::Config::load(None, &env).expect("the settings load");
        assert!(config.alipay.enabled && config.wechatpay.enabled);
        assert_eq!(config.wechatpay.apiv3_key.expose(), keys.apiv3_key);
        assert_eq!(config.alipay.public_keys, [keys.alipay.public_pem()]);
        // Made once: the second look finds the same keys.
        let again = DemoKeys::at(&dir).expect("keys read");
        assert_eq!(again.wechatpay.public_pem(), keys.wechatpay.public_pem());
        assert_eq!(again.apiv3_key, keys.apiv3_key);
        std::fs::remove_dir_all(&dir).expect("cleaned up");
    }
}
