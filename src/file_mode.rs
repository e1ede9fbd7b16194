//! Files whose contents decide who is trusted: the callers file and the TLS private key.

use std::{fs::File, io::Read, path::Path};

/// Why a trusted file was not read.
#[derive(Debug)]
pub(crate) enum TrustedFileError {
    Io(std::io::Error),
    /// Group or others may write the file (its permission bits): they could let themselves in.
    WritableByOthers {
        mode: u32,
    },
}

/// Reads a file that decides who is trusted, refusing it if group or others may write it, as
/// ssh refuses such keys. The mode is read from the open file, so the file checked is the file
/// read even if the path is swapped meanwhile.
pub(crate) fn read_trusted(path: &Path) -> Result<Vec<u8>, TrustedFileError> {
    let mut file = File::open(path).map_err(TrustedFileError::Io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let metadata = file.metadata().map_err(TrustedFileError::Io)?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(TrustedFileError::WritableByOthers { mode });
        }
    }
    let mut contents = Vec::new();
    file.read_to_end(&mut contents)
        .map_err(TrustedFileError::Io)?;
    Ok(contents)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file_with_mode(dir: &tempfile::TempDir, mode: u32) -> std::path::PathBuf {
        let path = dir.path().join(format!("trusted-{mode:o}"));
        std::fs::write(&path, b"contents").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_file_only_its_owner_may_write_is_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400, 0o640, 0o644] {
            let path = file_with_mode(&dir, mode);
            assert_eq!(read_trusted(&path).unwrap(), b"contents", "{mode:o}");
        }
    }

    #[test]
    fn a_file_group_or_others_may_write_is_refused_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o666, 0o620, 0o602, 0o660] {
            let path = file_with_mode(&dir, mode);
            assert!(
                matches!(
                    read_trusted(&path),
                    Err(TrustedFileError::WritableByOthers { mode: m }) if m == mode
                ),
                "{mode:o}"
            );
        }
    }
}
