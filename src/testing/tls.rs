//! Throw-away certificates for TLS tests: a certificate authority made in memory, and server and
//! client certificates signed by it. Nothing is read from or written to the repository, so no
//! test needs a secret.
//!
//! Keys are ECDSA P-256; certificates are valid from 1975 to 4096 (tests never fail on a clock).
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use etcd_coord::testing::tls::TestCa;
//! use etcd_coord::testing::{ClusterOptions, EtcdCluster};
//!
//! let ca = TestCa::new("etcd test CA")?;
//! // etcd on https:// endpoints, requiring client certificates signed by `ca`.
//! let etcd = EtcdCluster::start_with(ClusterOptions::new(1).tls(ca.clone())).await?;
//! let me = ca.client_cert("app")?;
//! let client = etcd_coord::Connect::new(etcd.endpoints())
//!     .ca_cert_pem(ca.cert_pem())
//!     .client_cert_pem(me.cert_pem, me.key_pem)
//!     .connect()
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertKey {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for CertKey {
    // Keys stay out of test logs, even throw-away ones.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertKey").finish_non_exhaustive()
    }
}

/// A certificate authority that exists only in this process. Cheap to clone.
#[derive(Clone)]
pub struct TestCa {
    inner: Arc<CaInner>,
}

struct CaInner {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

fn failed(e: rcgen::Error) -> io::Error {
    io::Error::other(format!("generating a test certificate: {e}"))
}

impl TestCa {
    /// A new CA whose certificate has `common_name` as its subject.
    ///
    /// # Errors
    ///
    /// If key generation or signing fails (it does not, short of a broken crypto backend).
    ///
    /// # Examples
    ///
    /// ```
    /// let ca = etcd_coord::testing::tls::TestCa::new("test CA")?;
    /// assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new(common_name: &str) -> io::Result<TestCa> {
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.remove(DnType::CommonName);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(failed)?;
        Ok(TestCa {
            inner: Arc::new(CaInner {
                cert_pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }),
        })
    }

    /// The CA certificate (PEM): what clients and servers trust.
    ///
    /// # Examples
    ///
    /// ```
    /// let ca = etcd_coord::testing::tls::TestCa::new("test CA")?;
    /// let pem: &str = ca.cert_pem();
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn cert_pem(&self) -> &str {
        &self.inner.cert_pem
    }

    /// A server certificate for `localhost` and `127.0.0.1`, the names the harness's endpoints
    /// use.
    ///
    /// # Errors
    ///
    /// As [`TestCa::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// let ca = etcd_coord::testing::tls::TestCa::new("test CA")?;
    /// let server = ca.server_cert()?;
    /// assert!(server.key_pem.contains("PRIVATE KEY"));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn server_cert(&self) -> io::Result<CertKey> {
        self.sign(
            "etcd server",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject's common name is `common_name` (with client
    /// certificate authentication and etcd auth both on, etcd takes it as the user name).
    ///
    /// # Errors
    ///
    /// As [`TestCa::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// let ca = etcd_coord::testing::tls::TestCa::new("test CA")?;
    /// let client = ca.client_cert("app")?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn client_cert(&self, common_name: &str) -> io::Result<CertKey> {
        self.sign(common_name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn sign(
        &self,
        common_name: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> io::Result<CertKey> {
        let key = KeyPair::generate().map_err(failed)?;
        let mut params = CertificateParams::new(names).map_err(failed)?;
        params.distinguished_name.remove(DnType::CommonName);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.inner.issuer).map_err(failed)?;
        Ok(CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
