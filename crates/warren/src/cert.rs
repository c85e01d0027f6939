//! Client-certificate login (RabbitMQ's rabbitmq_auth_mechanism_ssl and the MQTT/STOMP
//! plugins' `ssl_cert_login`): the user is the common name of the verified client
//! certificate's subject.

use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::server::TlsStream;

/// The common name (CN) of the subject of the client's certificate, if it presented one.
/// rustls has verified it against `ca_file` by the time the handshake completes (without
/// `ca_file` no certificate is asked for, so there is none).
pub fn peer_common_name(stream: &TlsStream<TcpStream>) -> Option<String> {
    let cert = stream.get_ref().1.peer_certificates()?.first()?;
    common_name(cert)
}

/// The last CN in a certificate's subject (RFC 5280 §4.1.2.6; the most specific one, as
/// RabbitMQ's `ssl_cert_login_from = common_name` takes it).
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    subject_common_name(parsed.subject())
}

/// Reads the CN out of a DER Name's contents: a sequence of RDN SETs, each holding
/// AttributeTypeAndValue SEQUENCEs `{ OID, value }` (RFC 5280 §4.1.2.4).
fn subject_common_name(mut name: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
    let mut found = None;
    while !name.is_empty() {
        let (tag, mut rdn, rest) = der_take(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        while !rdn.is_empty() {
            let (tag, atv, rest) = der_take(rdn)?;
            rdn = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = der_take(atv)?;
            let (value_tag, value, _) = der_take(value)?;
            if oid_tag != 0x06 || oid != CN_OID {
                continue;
            }
            found = match value_tag {
                // UTF8String, PrintableString, IA5String, TeletexString (as Latin-1 bytes).
                0x0c | 0x13 | 0x16 | 0x14 => Some(String::from_utf8(value.to_vec()).ok()?),
                // BMPString: UTF-16BE.
                0x1e => {
                    let units: Vec<u16> = value
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                    Some(String::from_utf16(&units).ok()?)
                }
                _ => None,
            };
        }
    }
    found
}

/// Splits one DER TLV off `input`: (tag, contents, rest). Definite lengths only, as DER
/// requires.
fn der_take(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_name_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Warren tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("alice"));
    }

    #[test]
    fn no_common_name_and_garbage_give_none() {
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "no cn");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()), None);
        assert_eq!(
            common_name(&CertificateDer::from(vec![0x30, 0x82, 0xff])),
            None
        );
        assert_eq!(subject_common_name(&[0x31, 0x05, 0x30, 0x03, 0x06]), None);
    }
}
