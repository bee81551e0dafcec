package main

import (
	"errors"
	"fmt"

	"github.com/urfave/cli/v2"

	"github.com/rafsnbd/rafsnbd/blockdev"
)

// imageFlags are the flags that name a RAFS image: its bootstrap and where
// its blobs are. Every command that composes an image takes them.
func imageFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "bootstrap", Aliases: []string{"B"}, Usage: "RAFS v6 bootstrap `FILE` (a layer's, or an image's merged one)"},
		&cli.StringFlag{Name: "blob-dir", Aliases: []string{"D"}, Usage: "`DIR` holding the blobs, one file per blob id (for tarfs: the layer tars)"},
	}
}

// haveImage reports whether the image flags were given.
func haveImage(c *cli.Context) bool { return c.IsSet("bootstrap") }

// openImage composes the image named by the image flags into a device.
func openImage(c *cli.Context) (*blockdev.Image, error) {
	boot, dir := c.String("bootstrap"), c.String("blob-dir")
	if boot == "" {
		return nil, errors.New("no image: give -B BOOTSTRAP (and -D BLOBDIR)")
	}
	if dir == "" {
		return nil, fmt.Errorf("-B %s needs -D BLOBDIR: the directory holding its blobs", boot)
	}
	img, err := blockdev.Open(c.Context, boot, blockdev.LocalBlobs{Dir: dir})
	if err != nil {
		return nil, err
	}
	logger(c).Debug().Str("bootstrap", boot).Int("blobs", len(img.Rafs.Blobs)).
		Int64("size", img.Size()).Uint32("block_size", img.BlockSize()).Msg("image composed")
	return img, nil
}
