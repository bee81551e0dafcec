package rafs

import (
	"bytes"
	"fmt"
	"io/fs"
	"sort"
	"strings"
)

// DirEntry is one directory entry: a name, the nid it points to and the
// file type recorded in the directory (FileType*).
type DirEntry struct {
	Name string
	Nid  uint64
	Type uint8
}

// ReadDir returns the entries of the directory nid in on-disk order, which
// is bytewise name order, without "." and "..". Every block of the
// directory is read and validated: dirent and name bounds, name syntax,
// global sort order, and the "." and ".." entries.
func (img *Image) ReadDir(nid uint64) ([]DirEntry, error) {
	e, err := img.Inode(nid)
	if err != nil {
		return nil, err
	}
	ents, _, err := img.readDir(e)
	return ents, err
}

// readDir parses a directory inode's data and also returns its ".." nid.
func (img *Image) readDir(e *Entry) (ents []DirEntry, parent uint64, err error) {
	s := fmt.Sprintf("inode %d", e.Nid)
	if !e.IsDir() {
		return nil, 0, fmt.Errorf("rafs: inode %d is not a directory (mode %#o)", e.Nid, e.Mode)
	}
	off := img.metaBase + e.Nid*InodeSlotSize
	blocks, tail, err := img.flatRanges(e, off, s)
	if err != nil {
		return nil, 0, err
	}
	data, err := img.flatData(e, off, s)
	if err != nil {
		return nil, 0, err
	}
	bs := int(img.BlockSize)
	var prev []byte
	haveDot, haveDotDot := false, false
	for start := 0; start < len(data); start += bs {
		blk := data[start:min(start+bs, len(data))]
		base := blocks[0] + uint64(start) // bootstrap offset of blk, for errors
		if uint64(start) >= blocks[1] {
			base = tail[0]
		}
		if len(blk) < DirentSize {
			return nil, 0, formatErr(base, s, "dirent", len(blk), "directory block of %d bytes cannot hold a dirent", len(blk))
		}
		first := int(le.Uint16(blk[8:]))
		if first < DirentSize || first%DirentSize != 0 || first > len(blk) {
			return nil, 0, formatErr(base+8, s, "nameoff", first,
				"first name offset must be a non-zero multiple of %d inside the %d-byte block", DirentSize, len(blk))
		}
		n := first / DirentSize
		for i := range n {
			var d Dirent
			d.Decode(blk[i*DirentSize:])
			doff := base + uint64(i*DirentSize)
			nameStart := int(d.NameOff)
			nameEnd := len(blk)
			if i+1 < n {
				nameEnd = int(le.Uint16(blk[(i+1)*DirentSize+8:]))
			}
			if nameStart < first || nameStart >= nameEnd || nameEnd > len(blk) {
				return nil, 0, formatErr(doff+8, s, "nameoff", d.NameOff,
					"name offsets out of order or outside the block (entry %d of %d, next at %d)", i, n, nameEnd)
			}
			name := blk[nameStart:nameEnd]
			if i+1 == n { // the last name ends at the first NUL
				if j := bytes.IndexByte(name, 0); j >= 0 {
					name = name[:j]
				}
			}
			switch {
			case len(name) == 0:
				return nil, 0, formatErr(doff+8, s, "name", "", "empty name")
			case len(name) > MaxNameLen:
				return nil, 0, formatErr(doff+8, s, "name", string(name[:32])+"...", "name longer than %d bytes", MaxNameLen)
			case bytes.IndexByte(name, '/') >= 0 || bytes.IndexByte(name, 0) >= 0:
				return nil, 0, formatErr(doff+8, s, "name", string(name), "name contains '/' or NUL")
			case d.FileType > FileTypeSymlink:
				return nil, 0, formatErr(doff+10, s, "file_type", d.FileType, "unknown file type")
			case prev != nil && bytes.Compare(prev, name) >= 0:
				return nil, 0, formatErr(doff+8, s, "name", string(name), "entries not in strictly increasing byte order (after %q)", prev)
			}
			prev = name
			switch string(name) {
			case ".":
				if d.Nid != e.Nid || d.FileType != FileTypeDir {
					return nil, 0, formatErr(doff, s, "nid", d.Nid, "\".\" must be a directory entry pointing to the directory itself")
				}
				haveDot = true
			case "..":
				if d.FileType != FileTypeDir {
					return nil, 0, formatErr(doff+10, s, "file_type", d.FileType, "\"..\" must be a directory entry")
				}
				parent, haveDotDot = d.Nid, true
			default:
				ents = append(ents, DirEntry{Name: string(name), Nid: d.Nid, Type: d.FileType})
			}
		}
	}
	if !haveDot || !haveDotDot {
		return nil, 0, formatErr(off, s, "i_size", e.Size, "directory lacks \".\" or \"..\"")
	}
	return ents, parent, nil
}

// maxSymlinkHops bounds symlink resolution in Lookup, like the kernel's
// MAXSYMLINKS.
const maxSymlinkHops = 40

// Lookup resolves a slash-separated path from the root directory ("/",
// "usr/bin/bash" and "/usr/bin/bash" all work) and returns the entry it
// names. Symlinks in intermediate components are followed inside the image
// (absolute targets start at the image root); a final symlink is not.
// A missing name yields an error wrapping fs.ErrNotExist.
func (img *Image) Lookup(path string) (*Entry, error) {
	root, err := img.Inode(img.RootNid())
	if err != nil {
		return nil, err
	}
	stack := []*Entry{root}
	comps := strings.Split(path, "/")
	hops := 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(stack) > 1 {
				stack = stack[:len(stack)-1]
			}
			continue
		}
		dir := stack[len(stack)-1]
		if !dir.IsDir() {
			return nil, fmt.Errorf("rafs: lookup %q: not a directory: %w", path, fs.ErrNotExist)
		}
		ents, _, err := img.readDir(dir)
		if err != nil {
			return nil, err
		}
		i := sort.Search(len(ents), func(i int) bool { return ents[i].Name >= c })
		if i == len(ents) || ents[i].Name != c {
			return nil, fmt.Errorf("rafs: lookup %q: %w", path, fs.ErrNotExist)
		}
		e, err := img.Inode(ents[i].Nid)
		if err != nil {
			return nil, err
		}
		if e.IsSymlink() && len(comps) > 0 {
			if hops++; hops > maxSymlinkHops {
				return nil, fmt.Errorf("rafs: lookup %q: too many levels of symbolic links", path)
			}
			if strings.HasPrefix(e.Target, "/") {
				stack = stack[:1]
			}
			comps = append(strings.Split(e.Target, "/"), comps...)
			continue
		}
		stack = append(stack, e)
	}
	return stack[len(stack)-1], nil
}

// Walk calls fn for every entry reachable from the root, depth first in
// directory order (bytewise by name), parents before children, starting
// with "/" for the root; paths are absolute. A hard-linked file is visited
// once per path. If fn returns fs.SkipDir for a directory its contents are
// skipped; for another entry, the rest of its directory is skipped.
// fs.SkipAll stops the walk without error. Walk validates the tree as it
// goes: every inode, "..", dirent types against modes, and that no
// directory is reached twice (a cycle or a hard-linked directory).
func (img *Image) Walk(fn func(path string, e *Entry) error) error {
	root, err := img.Inode(img.RootNid())
	if err != nil {
		return err
	}
	err = img.walk("/", root, root.Nid, map[uint64]bool{}, fn)
	if err == fs.SkipDir || err == fs.SkipAll {
		return nil
	}
	return err
}

func (img *Image) walk(path string, e *Entry, parent uint64, visited map[uint64]bool, fn func(string, *Entry) error) error {
	if e.IsDir() {
		if visited[e.Nid] {
			return &FormatError{Off: -1, Struct: fmt.Sprintf("inode %d", e.Nid), Field: "nid", Val: e.Nid,
				Msg: fmt.Sprintf("directory reached again at %q (a cycle or a hard-linked directory)", path)}
		}
		visited[e.Nid] = true
	}
	if err := fn(path, e); err != nil {
		if err == fs.SkipDir && e.IsDir() {
			return nil
		}
		return err
	}
	if !e.IsDir() {
		return nil
	}
	ents, dotdot, err := img.readDir(e)
	if err != nil {
		return err
	}
	if dotdot != parent {
		return &FormatError{Off: -1, Struct: fmt.Sprintf("inode %d", e.Nid), Field: "..", Val: dotdot,
			Msg: fmt.Sprintf("\"..\" of %q must point to its parent %d", path, parent)}
	}
	prefix := path
	if prefix != "/" {
		prefix += "/"
	}
	for _, d := range ents {
		child, err := img.Inode(d.Nid)
		if err != nil {
			return fmt.Errorf("%s%s: %w", prefix, d.Name, err)
		}
		if d.Type != FileTypeUnknown && d.Type != child.FileType() {
			return &FormatError{Off: -1, Struct: fmt.Sprintf("inode %d", e.Nid), Field: "file_type", Val: d.Type,
				Msg: fmt.Sprintf("dirent %q has type %d but inode %d has mode %#o", d.Name, d.Type, d.Nid, child.Mode)}
		}
		if err := img.walk(prefix+d.Name, child, e.Nid, visited, fn); err != nil {
			if err == fs.SkipDir {
				return nil
			}
			return err
		}
	}
	return nil
}
