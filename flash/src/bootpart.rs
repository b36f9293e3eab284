//! The FAT boot partition of a written card, reached without mounting: the MBR
//! is read with `mbrman`, the file system with `fatfs`.

use std::{
    fs::File,
    io::{Cursor, Read, Write},
};

use anyhow::{bail, Context};

/// MBR partition types of FAT file systems.
const FAT_TYPES: [u8; 7] = [0x01, 0x04, 0x06, 0x0b, 0x0c, 0x0e, 0xef];
/// The protective MBR of a GPT disk.
const GPT_PROTECTIVE: u8 = 0xee;

/// Where the boot partition lies, in bytes from the start of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPartition {
    pub index: usize,
    pub start: u64,
    pub len: u64,
}

/// Finds the first FAT partition in the MBR at the start of `head`.
pub fn find(head: &[u8]) -> anyhow::Result<BootPartition> {
    if head.len() < 512 || head[510..512] != [0x55, 0xaa] {
        bail!("the image has no MBR partition table (no 55 AA signature in its first sector)");
    }
    let mbr = mbrman::MBRHeader::read_from(&mut Cursor::new(&head[..512]))
        .map_err(|e| anyhow::anyhow!("the image's partition table cannot be read: {e}"))?;
    if mbr.iter().any(|(_, p)| p.sys == GPT_PROTECTIVE) {
        bail!("the image uses GPT; Secta images use an MBR partition table, as the Raspberry Pi firmware expects");
    }
    let (index, p) = mbr
        .iter()
        .find(|(_, p)| p.sectors > 0 && FAT_TYPES.contains(&p.sys))
        .context("the image has no FAT boot partition")?;
    Ok(BootPartition {
        index,
        start: u64::from(p.starting_lba) * 512,
        len: u64::from(p.sectors) * 512,
    })
}

/// Grows the last partition to the end of a target of `capacity` bytes when it
/// is a Linux partition (the box's data partition, formatted on first boot), so
/// the whole card is used. The MBR's 2 TiB limit caps it. Returns the new size
/// in bytes when it grew.
pub fn grow_data_partition(head: &mut [u8], capacity: u64) -> anyhow::Result<Option<u64>> {
    let mut mbr = mbrman::MBRHeader::read_from(&mut Cursor::new(&head[..512]))
        .map_err(|e| anyhow::anyhow!("the image's partition table cannot be read: {e}"))?;
    let Some((index, start, sectors)) = mbr
        .iter()
        .filter(|(_, p)| p.sectors > 0)
        .max_by_key(|(_, p)| p.starting_lba)
        .filter(|(_, p)| p.sys == 0x83)
        .map(|(i, p)| (i, u64::from(p.starting_lba), u64::from(p.sectors)))
    else {
        return Ok(None);
    };
    let end = (capacity / 512).min(u64::from(u32::MAX));
    if end <= start + sectors {
        return Ok(None);
    }
    let new = end - start;
    let entry = mbr.get_mut(index).context("partition entry")?;
    entry.sectors = u32::try_from(new).context("partition too large for MBR")?;
    mbr.write_into(&mut Cursor::new(&mut head[..512]))
        .map_err(|e| anyhow::anyhow!("writing the partition table: {e}"))?;
    Ok(Some(new * 512))
}

/// Runs `f` on the FAT file system of `part` inside `disk`, then unmounts it
/// (writing back the FAT's bookkeeping).
fn with_fs<T>(
    disk: &File,
    part: BootPartition,
    f: impl FnOnce(
        &fatfs::FileSystem<fscommon::BufStream<fscommon::StreamSlice<File>>>,
    ) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let slice = fscommon::StreamSlice::new(disk.try_clone()?, part.start, part.start + part.len)
        .context("the boot partition lies outside the target")?;
    let fs = fatfs::FileSystem::new(fscommon::BufStream::new(slice), fatfs::FsOptions::new())
        .map_err(|e| {
            anyhow::anyhow!("the boot partition is not a readable FAT file system: {e}")
        })?;
    let out = f(&fs)?;
    fs.unmount()
        .context("writing the boot partition's FAT back")?;
    Ok(out)
}

/// Writes `name` with `contents` into the root directory of the boot partition,
/// replacing an earlier one, and reads it back. `remove` lists files that go
/// (e.g. a previous first-boot report).
pub fn write_file(
    disk: &File,
    part: BootPartition,
    name: &str,
    contents: &[u8],
    remove: &[&str],
) -> anyhow::Result<()> {
    with_fs(disk, part, |fs| {
        let root = fs.root_dir();
        for old in remove.iter().chain(std::iter::once(&name)) {
            match root.remove(old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing the old {old}")),
            }
        }
        let mut file = root
            .create_file(name)
            .with_context(|| format!("creating {name} on the boot partition"))?;
        file.truncate()?;
        file.write_all(contents).map_err(|e| {
            anyhow::anyhow!("writing {name} on the boot partition failed: {e} (is it full?)")
        })?;
        file.flush()?;
        Ok(())
    })?;
    let back = read_file(disk, part, name)?;
    if back.as_deref() != Some(contents) {
        bail!("{name} read back from the boot partition differs from what was written");
    }
    Ok(())
}

/// Reads `name` from the root directory of the boot partition (None: absent).
pub fn read_file(disk: &File, part: BootPartition, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    with_fs(disk, part, |fs| match fs.root_dir().open_file(name) {
        Ok(mut f) => {
            let mut v = Vec::new();
            f.read_to_end(&mut v)?;
            Ok(Some(v))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_tables_it_cannot_use() {
        assert!(find(&[0u8; 512])
            .unwrap_err()
            .to_string()
            .contains("no MBR"));
        let mut gpt = vec![0u8; 512];
        gpt[510] = 0x55;
        gpt[511] = 0xaa;
        gpt[446 + 4] = 0xee;
        gpt[446 + 8] = 1;
        gpt[446 + 12] = 0xff;
        assert!(find(&gpt).unwrap_err().to_string().contains("GPT"));
        let mut linux_only = gpt.clone();
        linux_only[446 + 4] = 0x83;
        assert!(find(&linux_only)
            .unwrap_err()
            .to_string()
            .contains("no FAT"));
    }

    #[test]
    fn the_data_partition_grows_to_the_card() {
        let mut head = vec![0u8; 512];
        head[510] = 0x55;
        head[511] = 0xaa;
        let entry = |h: &mut Vec<u8>, i: usize, kind: u8, start: u32, len: u32| {
            let e = 446 + 16 * i;
            h[e + 4] = kind;
            h[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            h[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
        };
        entry(&mut head, 0, 0x0c, 2048, 8192);
        entry(&mut head, 1, 0x83, 10240, 4096);
        // Fits already, or the card is no larger: unchanged.
        assert_eq!(grow_data_partition(&mut head, 14336 * 512).unwrap(), None);
        let grown = grow_data_partition(&mut head, 1 << 30).unwrap();
        assert_eq!(grown, Some((1 << 30) - 10240 * 512));
        assert_eq!(
            u32::from_le_bytes(head[446 + 16 + 12..446 + 16 + 16].try_into().unwrap()),
            (1 << 21) - 10240
        );
        assert_eq!(find(&head).unwrap().len, 8192 * 512, "boot partition kept");
        // The last partition is not Linux: left alone.
        head[446 + 16 + 4] = 0x0c;
        assert_eq!(grow_data_partition(&mut head, 2 << 30).unwrap(), None);
    }
}
