//! The geometry of a class's contact sheet (`contact_sheets/<wnid>.png`): a title band naming the
//! class, a column of row names (real / modes / samples) and rows of equally sized tiles with a
//! white gap. The worker draws by it and the report cuts the sheet into tiles by it, so the two
//! never disagree; sheets of earlier versions (no title, no row names, tiles at their own size)
//! are recognised by their size.

/// White pixels between tiles and around the grid.
pub const GAP: u32 = 2;
/// Side of one glyph of the sheet's bitmap font before scaling (font8x8).
pub const GLYPH: u32 = 8;
/// Tiles are enlarged by a whole factor until they are at least this many pixels wide, so that a
/// 28-pixel Fashion-MNIST image is readable in the sheet.
pub const MIN_SHOWN: u32 = 96;
/// Row names, top to bottom.
pub const ROW_NAMES: [&str; 3] = ["real", "modes", "samples"];

/// Where everything is on a contact sheet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SheetLayout {
    /// Tile width and height on the sheet, in pixels (after enlarging).
    pub tile: (u32, u32),
    /// Height of the title band (0 on sheets of earlier versions).
    pub header: u32,
    /// Width of the row-name column (0 on sheets of earlier versions).
    pub label_width: u32,
    /// Glyph scale of the title and row names.
    pub text_scale: u32,
    /// Tiles per row.
    pub columns: u32,
    /// Rows of tiles.
    pub rows: u32,
}

impl SheetLayout {
    /// The layout the worker draws: `columns` × `rows` images of `image` (width, height) pixels,
    /// enlarged by the smallest whole factor that makes them [`MIN_SHOWN`] wide.
    pub fn labelled(image: (u32, u32), columns: u32, rows: u32) -> Self {
        let factor = MIN_SHOWN.div_ceil(image.0.max(1)).max(1);
        let text_scale = 2;
        let longest = ROW_NAMES.iter().map(|n| n.len() as u32).max().unwrap_or(0);
        SheetLayout {
            tile: (image.0 * factor, image.1 * factor),
            header: GLYPH * text_scale + 4 * GAP * text_scale,
            label_width: longest * GLYPH * text_scale + 4 * GAP * text_scale,
            text_scale,
            columns: columns.max(1),
            rows,
        }
    }

    /// The sheet's size in pixels (width, height).
    pub fn size(&self) -> (u32, u32) {
        (
            self.label_width + self.columns * (self.tile.0 + GAP) + GAP,
            self.header + self.rows * (self.tile.1 + GAP) + GAP,
        )
    }

    /// The top-left pixel of tile `column` of row `row`.
    pub fn tile_origin(&self, column: u32, row: u32) -> (u32, u32) {
        (self.label_width + GAP + column * (self.tile.0 + GAP), self.header + GAP + row * (self.tile.1 + GAP))
    }

    /// The layout of a sheet of `size` pixels holding `columns` tiles in each of `rows` rows:
    /// this version's labelled layout when the size is one it draws, else the unlabelled grid of
    /// earlier versions (square tiles, no title, no names). `None` when neither fits.
    pub fn of_sheet(size: (u32, u32), columns: u32, rows: u32) -> Option<Self> {
        let (columns, rows) = (columns.max(1), rows.max(1));
        // The labelled layout: the tile width follows from the width once the name column is
        // known, and the height must agree.
        let probe = Self::labelled((1, 1), columns, rows);
        let inner = size.0.checked_sub(probe.label_width + GAP)?;
        if inner.is_multiple_of(columns) && inner / columns > GAP {
            let tile_w = inner / columns - GAP;
            if let Some(tile_h) = size.1.checked_sub(probe.header + GAP).map(|h| h / rows)
                && tile_h > GAP
            {
                let layout = SheetLayout { tile: (tile_w, tile_h - GAP), ..probe };
                if layout.size() == size {
                    return Some(layout);
                }
            }
        }
        let inner = size.0.checked_sub(GAP)?;
        if !inner.is_multiple_of(columns) || inner / columns <= GAP {
            return None;
        }
        let tile_w = inner / columns - GAP;
        let tile_h = size.1.checked_sub(GAP)? / rows;
        let layout = SheetLayout {
            tile: (tile_w, tile_h.checked_sub(GAP)?),
            header: 0,
            label_width: 0,
            text_scale: 0,
            columns,
            rows,
        };
        (layout.size() == size).then_some(layout)
    }
}

/// Draws `text` at (`x`, `y`) (top-left) in the 8 × 8 public-domain font8x8 glyphs, each pixel
/// `scale` × `scale`, in `colour`; characters without a glyph are drawn as `?`, and whatever
/// falls outside the canvas is cut. Returns the width drawn, in pixels.
pub fn draw_text(canvas: &mut image::RgbImage, x: u32, y: u32, text: &str, scale: u32, colour: [u8; 3]) -> u32 {
    use font8x8::UnicodeFonts;
    let scale = scale.max(1);
    let mut pen = x;
    for ch in text.chars() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::LATIN_FONTS.get(ch))
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (pen + col * scale + dx, y + row as u32 * scale + dy);
                        if px < canvas.width() && py < canvas.height() {
                            canvas.put_pixel(px, py, image::Rgb(colour));
                        }
                    }
                }
            }
        }
        pen += GLYPH * scale;
    }
    pen - x
}

/// `text` cut to at most `width` pixels at `scale`, ending in `…` (as `~`, the font has no
/// ellipsis) when cut.
pub fn fit_text(text: &str, width: u32, scale: u32) -> String {
    let fits = (width / (GLYPH * scale.max(1))) as usize;
    if text.chars().count() <= fits {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(fits.saturating_sub(1)).collect();
    cut.push('~');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report finds the layout the worker drew from the sheet's size alone, for tiny and
    /// large images, and still reads the unlabelled sheets of earlier versions.
    #[test]
    fn the_layout_is_found_again_from_the_sheets_size() {
        for (image, columns) in [((28, 28), 10), ((256, 256), 50), ((32, 32), 1), ((512, 512), 100), ((97, 97), 3)] {
            let drawn = SheetLayout::labelled(image, columns, 3);
            assert!(drawn.tile.0 >= MIN_SHOWN && drawn.tile.0.is_multiple_of(image.0), "{drawn:?}");
            assert_eq!(SheetLayout::of_sheet(drawn.size(), columns, 3), Some(drawn), "{image:?} × {columns}");
        }
        assert_eq!(SheetLayout::labelled((28, 28), 10, 3).tile, (112, 112));
        // An earlier version's sheet: 10 tiles of 28 px, three rows, 2-pixel gaps.
        let old = SheetLayout::of_sheet((10 * 30 + 2, 3 * 30 + 2), 10, 3).unwrap();
        assert_eq!((old.tile, old.header, old.label_width), ((28, 28), 0, 0));
        assert_eq!(old.tile_origin(1, 2), (32, 62));
        assert_eq!(SheetLayout::of_sheet((301, 92), 10, 3), None);
    }

    /// Text lands where it is asked to, in the colour asked, and is cut to fit.
    #[test]
    fn text_is_drawn_and_fitted() {
        let mut canvas = image::RgbImage::from_pixel(100, 20, image::Rgb([255; 3]));
        let width = draw_text(&mut canvas, 2, 2, "Ab", 2, [0, 0, 0]);
        assert_eq!(width, 32);
        let dark = |x0: u32, x1: u32| {
            (x0..x1)
                .flat_map(|x| (0..20).map(move |y| (x, y)))
                .filter(|&(x, y)| canvas.get_pixel(x, y).0 == [0, 0, 0])
                .count()
        };
        assert!(dark(2, 18) > 10 && dark(18, 34) > 10 && dark(34, 100) == 0);
        assert_eq!(fit_text("n01440764 tench", 80, 1), "n01440764~");
        assert_eq!(fit_text("real", 80, 2), "real");
    }
}
