//! File contents: zero-copy reads from the image or the overlay, and writes that copy an
//! image file's data up into the overlay on first change.

use std::sync::Arc;

use crate::format::Kind;

use super::node::{Body, Node};
use super::{Fs, FsError, MAX_FILE_SIZE, NodeId, now};

impl Fs {
    /// A file's whole contents without copying (image mapping or overlay data), e.g. for
    /// the ELF loader.
    pub fn contents(&self, id: NodeId) -> Result<&[u8], FsError> {
        match (self.nodes.get(&id), id) {
            (
                Some(Node {
                    body: Body::File(data),
                    ..
                }),
                _,
            ) => Ok(data),
            (
                Some(Node {
                    kind: Kind::File,
                    body: Body::ImageData,
                    ..
                }),
                NodeId::Image(ino),
            )
            | (None, NodeId::Image(ino)) => match self.image.inode(ino)?.kind {
                Kind::File => Ok(self.image.file_bytes(ino)?),
                Kind::Dir => Err(FsError::IsDir),
                Kind::Symlink | Kind::Fifo | Kind::Socket => Err(FsError::Invalid),
            },
            (Some(node), _) if node.kind == Kind::Dir => Err(FsError::IsDir),
            (Some(_), _) => Err(FsError::Invalid),
            (None, NodeId::Overlay(_)) => Err(FsError::NotFound),
        }
    }

    /// Reads file bytes at `offset` into `buf`; returns the count (0 at or past the end).
    pub fn read_at(&self, id: NodeId, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        let data = self.contents(id)?;
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let available = data.get(start..).unwrap_or_default();
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        Ok(n)
    }

    /// `(offset, len)` of the node's data in the image file when it is an unchanged image
    /// file starting on a page boundary: the VMM may then map the image file there instead of
    /// copying. `None` once the overlay holds its data, or when the data is not aligned.
    pub fn image_backing(&self, id: NodeId) -> Result<Option<(u64, u64)>, FsError> {
        let NodeId::Image(ino) = id else {
            return Ok(None);
        };
        if let Some(node) = self.nodes.get(&id) {
            if node.kind != Kind::File || !matches!(node.body, Body::ImageData) {
                return Ok(None);
            }
        } else if self.image.inode(ino)?.kind != Kind::File {
            return Ok(None);
        }
        let offset = self.image.file_page_offset(ino)?;
        Ok(offset.map(|offset| (offset, self.image.inode(ino).map_or(0, |info| info.size))))
    }

    /// The file's data as an owned overlay buffer, copying image data up on first change.
    /// The caller has checked room for the copy ([`Fs::data_copy_cost`]).
    fn data_mut(&mut self, id: NodeId) -> Result<&mut Vec<u8>, FsError> {
        let copied = match self.view(id)? {
            Node {
                kind: Kind::File,
                body: Body::ImageData,
                ..
            } => Some(self.contents(id)?.to_vec()),
            Node {
                kind: Kind::File, ..
            } => None,
            Node {
                kind: Kind::Dir, ..
            } => return Err(FsError::IsDir),
            Node { .. } => return Err(FsError::Invalid),
        };
        if let Some(data) = copied {
            let len = data.len() as u64;
            self.node_mut(id)?.body = Body::File(Arc::new(data));
            self.used += len;
        }
        match &mut self.node_mut(id)?.body {
            Body::File(data) => Ok(Arc::make_mut(data)),
            _ => Err(FsError::Invalid),
        }
    }

    /// Bytes a first change of `id`'s data would copy up (metadata record included).
    fn data_copy_cost(&self, id: NodeId) -> Result<u64, FsError> {
        let copy = match self.nodes.get(&id) {
            Some(Node {
                body: Body::ImageData,
                ..
            })
            | None => self.contents(id)?.len() as u64,
            Some(_) => 0,
        };
        Ok(self.copy_up_cost(id) + copy)
    }

    /// Writes `data` at `offset`, extending the file (zero-filled) as needed; returns the
    /// count. The first write to an image file copies its data into the overlay.
    pub fn write_at(&mut self, id: NodeId, offset: u64, data: &[u8]) -> Result<usize, FsError> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&end| end <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        let current = self.contents(id)?.len() as u64;
        if data.is_empty() {
            return Ok(0);
        }
        self.ensure_room(self.data_copy_cost(id)? + end.saturating_sub(current))?;
        let growth = end.saturating_sub(current);
        let file = self.data_mut(id)?;
        let (start, end) = (offset as usize, end as usize);
        if end > file.len() {
            file.try_reserve(end - file.len())
                .map_err(|_| FsError::NoSpace)?;
            file.resize(end, 0);
        }
        file[start..end].copy_from_slice(data);
        self.used += growth;
        self.touch_data(id)?;
        Ok(data.len())
    }

    /// Sets a file's size, cutting or zero-extending it.
    pub fn truncate(&mut self, id: NodeId, len: u64) -> Result<(), FsError> {
        if len > MAX_FILE_SIZE {
            return Err(FsError::FileTooBig);
        }
        let current = self.contents(id)?.len() as u64;
        self.ensure_room(self.data_copy_cost(id)? + len.saturating_sub(current))?;
        let file = self.data_mut(id)?;
        let len = len as usize;
        if len > file.len() {
            file.try_reserve(len - file.len())
                .map_err(|_| FsError::NoSpace)?;
        }
        file.resize(len, 0);
        // `used` already holds `current` bytes for this file (charged at copy-up if need be).
        self.used = self.used - current + len as u64;
        self.touch_data(id)
    }

    /// Stamps a data change: mtime and ctime become now.
    fn touch_data(&mut self, id: NodeId) -> Result<(), FsError> {
        let time = now();
        let node = self.node_mut(id)?;
        node.mtime = time;
        node.ctime = time;
        Ok(())
    }
}
