//! The CA API's client, as a node agent uses it: TLS to the CA (verified against the CA's
//! root, server name [`SERVING_DNS_NAME`]), bearer token, one call per certificate.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::authority::SERVING_DNS_NAME;
use crate::pb::IstioCertificateRequest;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("CA address {0:?}: {1}")]
    Address(String, String),
    #[error("token: {0}")]
    Token(String),
    /// The call failed: the CA's answer (or the transport's) with its gRPC code.
    #[error("{}: {}", .0.code(), .0.message())]
    Call(#[from] tonic::Status),
}

impl CaClientError {
    /// The CA could not be reached or did not answer (vs. answered with a refusal).
    pub fn is_unreachable(&self) -> bool {
        use tonic::Code;
        matches!(
            self.code(),
            Some(Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled)
        )
    }

    /// The gRPC code, when the call got that far.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Call(s) => Some(s.code()),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct CaClient {
    inner: IstioCertificateServiceClient<Channel>,
    auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    address: String,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl CaClient {
    /// `address` is `host:port` or an `https://` URL; `root_pem` the CA's root. Connects
    /// lazily (and again after failures): an unreachable CA is an error of each call.
    /// Needs a tokio runtime.
    pub fn new(address: &str, root_pem: &str, token: &str) -> Result<Self, CaClientError> {
        let url = if address.contains("://") {
            address.to_string()
        } else {
            format!("https://{address}")
        };
        let bad = |e: &dyn std::fmt::Display| CaClientError::Address(address.into(), e.to_string());
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name(SERVING_DNS_NAME);
        let channel = Endpoint::from_shared(url)
            .map_err(|e| bad(&e))?
            .tls_config(tls)
            .map_err(|e| bad(&e))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        let auth = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| CaClientError::Token("not a valid header value".into()))?;
        Ok(Self {
            inner: IstioCertificateServiceClient::new(channel),
            auth,
            address: address.to_string(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Ask for a certificate for the CSR's identity: the chain as PEM strings, leaf first.
    pub async fn create_certificate(
        &self,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<Vec<String>, CaClientError> {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_string(),
            validity_duration: validity.as_secs().min(i64::MAX as u64) as i64,
            metadata: None,
        });
        req.metadata_mut()
            .insert("authorization", self.auth.clone());
        let resp = self.inner.clone().create_certificate(req).await?;
        Ok(resp.into_inner().cert_chain)
    }
}
