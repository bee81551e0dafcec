package main

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// makeBlobDir creates the blob directory, and any missing parents, when it
// is missing. The undo it returns is for a create that failed: in
// directories create made it removes the blobs the build wrote and then
// the directories themselves, so that a failed create leaves nothing
// behind. In a directory that was there before it removes nothing: a blob
// is named by its content, and the same blob may belong to other images.
func makeBlobDir(dir string) (undo func(*build.Result), err error) {
	var made []string // deepest first
	for p := filepath.Clean(dir); ; {
		_, err := os.Lstat(p)
		if err == nil {
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		made = append(made, p)
		parent := filepath.Dir(p)
		if parent == p {
			break
		}
		p = parent
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return func(res *build.Result) {
		if len(made) == 0 {
			return
		}
		if res != nil {
			for _, b := range res.Blobs {
				os.Remove(b.Path)
			}
		}
		for _, d := range made {
			os.Remove(d) // only if empty: never what someone else put there
		}
	}, nil
}
